"""The ``granularity`` command line: one subcommand per MLproject entry point."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from granularity.commands import COMMANDS
from granularity.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# NOTE: the command modules take their option choices from the model and training modules, which import
# torch, timm and segmentation-models-pytorch, so even `--help` takes several seconds.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granularity",
        description="Measure how annotation granularity (outlines, ellipses, boxes) changes nuclei models, tracked in MLflow.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"granularity.commands.{name}")
        except ModuleNotFoundError as error:
            # Only a command module that does not exist yet is skipped; a missing dependency inside one is a real fault.
            if error.name != f"granularity.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Third-party libraries log every HTTP retry and migration at INFO; keep the user's console readable.
    for noisy in ("alembic", "urllib3", "botocore", "mlflow.store", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # MLflow warns about integer columns in every logged table and model signature; the hint does not apply to these.
    warnings.filterwarnings("ignore", message=".*[Ii]nteger column.*", category=UserWarning)

    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
