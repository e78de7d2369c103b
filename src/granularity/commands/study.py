"""``granularity study``: train every configuration of a preset as child runs of one study run."""

from __future__ import annotations

import argparse
import logging

from granularity.errors import ConfigError
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
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from granularity.study.runner import run_study

    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is invalid; use 1 or more")
    result = run_study(args.preset, seeds=args.seeds, experiment=args.experiment)

    print(f"study run {result.parent_run_id}: {result.progress_line()}")
    for description in result.failed:
        print(f"failed: {description}")
    if result.failed:
        print("run the same command again to retry the failed configurations")
        return 1
    print(f"compare the runs with: granularity compare --experiment {args.experiment} --study {result.parent_run_id}")
    return 0
