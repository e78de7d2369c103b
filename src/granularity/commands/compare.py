"""``granularity compare``: rebuild the study's tables and figures from the tracked runs."""

from __future__ import annotations

import argparse
import logging

from granularity.tracking.uri import DEFAULT_EXPERIMENT

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="rebuild Tables II-IV, the improvement table and Figs. 3-4 from finished runs",
        description="Read every finished classification and segmentation run of an experiment (or of one study), "
        "write Tables II, III and IV, the pixel-wise improvement, the published tables and Figs. 3 and 4 as "
        "Markdown, CSV, HTML and PNG, and log them as artifacts of a run tagged task=compare.",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--study", default=None, metavar="RUN_ID", help="compare only the child runs of this study parent run")
    parser.add_argument("--out", default="out/compare", metavar="DIR", help="folder for the tables and figures (default: %(default)s)")
    parser.add_argument("--no-log", action="store_true", help="write the files only, without logging a compare run")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from granularity.report.compare import compare
    from granularity.tracking.uri import check_tracking_server, resolve_tracking_uri

    check_tracking_server(resolve_tracking_uri())
    result = compare(args.experiment, args.out, study_run_id=args.study, log_run=not args.no_log)

    print(result.markdown())
    if result.run_table.left_out:
        print(f"{len(result.run_table.left_out)} runs left out; reasons in {args.out}/left_out_runs.csv")
    for note in result.notes:
        print(f"fig4: {note}")
    print(f"wrote {len(result.files)} files to {args.out}")
    if result.compare_run_id:
        print(f"logged as run {result.compare_run_id}; open it with `mlflow ui --backend-store-uri {resolve_tracking_uri()}`")
    return 0
