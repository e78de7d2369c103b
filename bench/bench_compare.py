"""Benchmark of ``compare`` on 2,000 synthetic finished runs in an SQLite store, against a plain client loop.

Steps, in one process:

1. ``log``: create the runs with the tags, parameters and metric names that
   ``classify`` and ``segment`` log (the study's grid, repeated over seeds),
   one ``MlflowClient.log_batch`` call per run.
2. ``loop``: the plain reference. It fetches every run one by one with
   ``MlflowClient.get_run``. The run ids are known from step 1, so listing
   them costs nothing here. It builds the same run table as ``compare`` and
   from it the same result tables (Tables II to IV and the improvement).
3. ``compare``: the whole ``compare`` call: paged ``search_runs``, the same
   tables, the published tables, all files, Figs. 3 and 4, and the compare
   run with its artifacts.

``compare`` does more than the loop (files, figures and the logged run), so
``loop / compare`` understates the reading speed-up; ``read`` (the paged
reading alone) and ``tables`` (building the tables alone) show the parts.
Each step except ``log`` runs ``--repeat`` times in turn and the medians are
reported.

Usage:
    .venv/bin/python bench/bench_compare.py [--runs 2000] [--store DIR] [--repeat 3] [--out bench/results/compare.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "bench-compare"
CLASSES = ("other", "inflammatory", "epithelial", "spindle")
CLASSIFICATION_GRID = list(itertools.product(("vgg16", "resnet18", "mobilenet"), ("pw", "el", "bd"), (32, 64, 128)))
SEGMENTATION_GRID = list(itertools.product(("unet", "fpn", "linknet"), ("pw", "el", "bd")))


def classification_metrics(rng) -> dict[str, float]:
    metrics = {name: rng.uniform(0.6, 0.95) for name in ("test_precision", "test_recall", "test_f1", "test_accuracy")}
    metrics.update({f"test_class_accuracy_{name}": rng.uniform(0.5, 1.0) for name in CLASSES})
    metrics.update({f"own_{name}": value for name, value in list(metrics.items())})
    return metrics


def segmentation_metrics(rng) -> dict[str, float]:
    names = ["test_pixel_accuracy", "test_dice", "test_nuclei_recall", "test_cancer_recall", "test_detection_f1", "test_pq"]
    names += [f"test_dice_{name}" for name in CLASSES]
    metrics = {name: rng.uniform(0.5, 0.99) for name in names}
    metrics.update({f"own_{name}": value for name, value in list(metrics.items())})
    return metrics


def log_runs(client, experiment_id: str, count: int, seed: int = 0) -> list[str]:
    """Create ``count`` finished runs over the study's grid and seeds; return their ids."""
    from mlflow.entities import Metric, Param, RunTag

    from granularity.tracking.keys import config_key

    rng = np.random.default_rng(seed)
    grid = [("classification", *values) for values in CLASSIFICATION_GRID] + [("segmentation", model, granularity, None) for model, granularity in SEGMENTATION_GRID]
    run_ids = []
    timestamp = int(time.time() * 1000)
    for index in range(count):
        task, model, granularity, patch_size = grid[index % len(grid)]
        run_seed = index // len(grid)
        config = {"dataset": "consep-256", "model": model, "granularity": granularity, "seed": run_seed, "epochs": 30, "lr": 0.001}
        if patch_size:
            config["patch_size"] = patch_size
        tags = {"task": task, "model": model, "granularity": granularity, "dataset": "consep-256", "dataset_digest": "0" * 16, "git_commit": "bench", "config_key": config_key(config)}
        if patch_size:
            tags["patch_size"] = str(patch_size)
        metrics = classification_metrics(rng) if task == "classification" else segmentation_metrics(rng)

        run = client.create_run(experiment_id, tags=tags, run_name=f"{task}-{model}-{granularity}-{run_seed}")
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(name, float(value), timestamp, 0) for name, value in metrics.items()],
            params=[Param(name, str(value)) for name, value in config.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        run_ids.append(run.info.run_id)
    return run_ids


def build_tables(runs):
    """Build Tables II to IV and the improvement table from a run table, as ``compare`` does."""
    from granularity.report.improvement import improvement_table
    from granularity.report.tables import table2_classification, table3_class_accuracy, table4_segmentation

    tables = [table2_classification(runs), table3_class_accuracy(runs), table4_segmentation(runs)]
    return tables, improvement_table(runs)


def plain_loop(client, run_ids: list[str]):
    """Fetch every run with get_run, build the run table and the result tables; return (run table, tables, improvement)."""
    from granularity.tracking.search import build_run_table

    run_table = build_run_table(client.get_run(run_id) for run_id in run_ids)
    tables, improvement = build_tables(run_table.runs)
    return run_table, tables, improvement


def same_tables(first: list, second: list) -> bool:
    """Return True when two lists of ResultTable hold equal cells."""
    import pandas as pd

    for a, b in zip(first, second):
        try:
            pd.testing.assert_frame_equal(a.cells, b.cells)
        except AssertionError:
            return False
    return len(first) == len(second)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="number of synthetic runs (default: %(default)s)")
    parser.add_argument("--store", default=None, help="folder for the SQLite store, its artifacts and the report; an existing store is reused (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the timed steps; medians are reported (default: %(default)s)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "compare.json"), help="JSON file for the results")
    args = parser.parse_args()

    logging.basicConfig(level=logging.ERROR)
    folder = Path(args.store or tempfile.mkdtemp(prefix="bench-compare-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri

    from mlflow import MlflowClient

    from granularity.report.compare import compare
    from granularity.tracking.search import find_experiment_id, read_runs

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(EXPERIMENT)
    if existing is None:
        # Artifacts go next to the store, not into ./mlruns of the working directory.
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
        started = time.perf_counter()
        run_ids = log_runs(client, experiment_id, args.runs)
        log_s = time.perf_counter() - started
        print(f"logged {len(run_ids)} runs in {log_s:.1f} s", flush=True)
    else:
        # A store kept from an earlier run (--store) is reused, so the slow logging step runs once.
        run_ids = [run.info.run_id for run in client.search_runs([existing.experiment_id], "tags.task != 'compare'", max_results=50000)]
        log_s = float("nan")
        print(f"reusing {len(run_ids)} runs of {folder}", flush=True)
    experiment_id = find_experiment_id(client, EXPERIMENT)

    load_before = os.getloadavg()
    timings: dict[str, list[float]] = {"loop": [], "read": [], "tables": [], "compare": []}
    for _ in range(args.repeat):
        started = time.perf_counter()
        loop_table, loop_tables, _ = plain_loop(client, run_ids)
        timings["loop"].append(time.perf_counter() - started)

        started = time.perf_counter()
        read_table = read_runs(client, experiment_id)
        timings["read"].append(time.perf_counter() - started)

        started = time.perf_counter()
        build_tables(read_table.runs)
        timings["tables"].append(time.perf_counter() - started)

        started = time.perf_counter()
        result = compare(EXPERIMENT, folder / "report", client=client)
        timings["compare"].append(time.perf_counter() - started)
        print(", ".join(f"{name} {values[-1]:.2f} s" for name, values in timings.items()), flush=True)
    load_after = os.getloadavg()

    if len(loop_table.runs) != len(read_table.runs) or len(result.run_table.runs) != len(run_ids):
        print(f"run counts differ: loop {len(loop_table.runs)}, read {len(read_table.runs)}, compare {len(result.run_table.runs)}", file=sys.stderr)
        return 1
    if not same_tables(loop_tables, result.tables):
        print("the loop's tables differ from compare's", file=sys.stderr)
        return 1

    medians = {name: statistics.median(values) for name, values in timings.items()}
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "runs": len(run_ids),
        "log_s": round(log_s, 2),
        "repeat": args.repeat,
        **{f"{name}_s": round(value, 3) for name, value in medians.items()},
        "all_s": {name: [round(value, 3) for value in values] for name, values in timings.items()},
        "loop_over_compare": round(medians["loop"] / medians["compare"], 2),
        "loop_over_read": round(medians["loop"] / medians["read"], 2),
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in load_after],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
