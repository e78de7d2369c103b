#!/usr/bin/env python
"""Start a team tracking server without Docker: PostgreSQL, an S3 endpoint and MLflow on 127.0.0.1.

Prints the tracking URI once every service is healthy and stops all of them
on Ctrl-C or SIGTERM. Logs and a ``stack.env`` file with every address and
credential go to the stack's temporary folder, which is removed on exit
unless ``--keep`` is given or a service fails to start.

    .venv/bin/python scripts/tracking_stack.py
    .venv/bin/python scripts/tracking_stack.py --basic-auth --port 5000
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from granularity.errors import UserError
from granularity.tracking.stack import DEFAULT_ADMIN_USERNAME, DEFAULT_BUCKET, START_TIMEOUT_S, BasicAuth, TrackingStack

EXIT_USER_ERROR = 2
EXIT_SERVICE_DIED = 1

logger = logging.getLogger("tracking_stack")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="port of the MLflow server on 127.0.0.1 (default: a free port)")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help=f"S3 bucket for artifacts (default: {DEFAULT_BUCKET})")
    parser.add_argument(
        "--basic-auth",
        action="store_true",
        help="run MLflow's basic-auth app; the admin is MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD "
        "from the environment, or a generated password written to stack.env",
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the MLflow server (default: 1)")
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for each service to become healthy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with logs and data after exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    return parser


def read_basic_auth(enabled: bool) -> BasicAuth | None:
    if not enabled:
        return None
    username = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or DEFAULT_ADMIN_USERNAME
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    return BasicAuth(username, password) if password else BasicAuth(username)


def print_summary(stack: TrackingStack, env_file) -> None:
    print("Tracking stack is running; stop it with Ctrl-C.")
    print(f"MLFLOW_TRACKING_URI={stack.tracking_uri}")
    print(f"UI: {stack.tracking_uri}")
    if stack.basic_auth is not None:
        print(f"basic auth: user {stack.basic_auth.username}; the password is in {env_file}")
    print(f"addresses and credentials: {env_file}")
    print(f"logs: {stack.folder}", flush=True)


def watch(stack: TrackingStack) -> int:
    """Wait for Ctrl-C or SIGTERM; return an error code early if a service stops by itself."""
    while True:
        for server in (stack.postgres, stack.s3, stack.mlflow):
            if not server.is_running:
                logger.error("%s stopped unexpectedly; read its log %s", server.name, server.log_path)
                stack.keep_folder = True
                return EXIT_SERVICE_DIED
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # SIGTERM takes the same way out as Ctrl-C, so both stop every service.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    stack = None
    try:
        stack = TrackingStack(
            bucket=args.bucket,
            basic_auth=read_basic_auth(args.basic_auth),
            mlflow_port=args.port,
            workers=args.workers,
            keep_folder=args.keep,
        )
        stack.start(args.timeout)
        print_summary(stack, stack.write_env_file())
        return watch(stack)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        logger.info("stopping the tracking stack")
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
