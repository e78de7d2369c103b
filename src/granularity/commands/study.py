"""``granularity study``: train every configuration of a preset as child runs of one study run."""

from __future__ import annotations

import argparse
import logging

from granularity.errors import ConfigError
from granularity.study.distributed import DEFAULT_HEARTBEAT_INTERVAL_S, run_distributed_study
from granularity.tracking.uri import DEFAULT_EXPERIMENT

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run every configuration of a study preset; a rerun continues where the last one stopped",
        description="Expand a study preset (mlproject/studies/NAME.yaml or a YAML file) into classification and "
        "segmentation configurations and train each as a child run of one study run. Configurations that "
        "finished before are skipped, interrupted ones resumed from their checkpoints, failed ones rerun.",
    )
    parser.add_argument("--preset", required=True, metavar="NAME|FILE", help="preset name (quick, paper) or path to a preset YAML file")
    parser.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1 for every task instead of the preset's seeds")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage shared by workers on any number of machines, e.g. postgresql+psycopg2://user:password@host:5432/optuna; "
        "each worker pulls the next configuration, none runs one twice (default: one process, no storage)",
    )
    parser.add_argument("--study-name", default=None, metavar="NAME", help="Optuna study of the queue, with --storage (default: study-<preset>-<preset key>)")
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        metavar="SECONDS",
        help="with --storage: seconds between a worker's heartbeats; a configuration silent for twice as long is run again by another worker (default: %(default)s)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from granularity.study.runner import run_study

    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is invalid; use 1 or more")
    if args.study_name and not args.storage:
        raise ConfigError(f"--study-name {args.study_name} needs --storage URL; pass the Optuna storage the workers share")
    if args.storage:
        result = run_distributed_study(
            args.preset,
            args.storage,
            study_name=args.study_name,
            seeds=args.seeds,
            experiment=args.experiment,
            heartbeat_interval=args.heartbeat_interval,
        )
    else:
        result = run_study(args.preset, seeds=args.seeds, experiment=args.experiment)

    print(f"study run {result.parent_run_id}: {result.progress_line()}")
    for description in result.failed:
        print(f"failed: {description}")
    if result.failed:
        print("run the same command again to retry the failed configurations")
        return 1
    print(f"compare the runs with: granularity compare --experiment {args.experiment} --study {result.parent_run_id}")
    return 0
