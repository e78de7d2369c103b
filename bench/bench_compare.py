"""Benchmark of ``compare`` on 2,000 synthetic finished runs in an SQLite store, against a plain client loop.

Steps, in one process:

1. ``log``: create the runs with the tags, parameters and metric names that
   ``classify`` and ``segment`` log (the study's grid, repeated over seeds),
   one ``MlflowClient.log_batch`` call per run.
2. ``loop``: the plain reference. It fetches every run one by one with
   ``MlflowClient.get_run`` (the run ids are known from step 1, so listing
   them costs nothing here) and builds the same run table.
3. ``compare``: the whole ``compare`` call: paged ``search_runs``, Tables
   II to IV, improvement, published tables, Figs. 3 and 4, and the compare
   run with its artifacts.

The ratio compares ``loop`` with ``compare``; ``compare`` does more work
(tables, figures and the logged run), so the ratio understates the reading
speed-up. ``read`` times the paged reading alone.

Usage:
    .venv/bin/python bench/bench_compare.py [--runs 2000] [--store DIR] [--out bench/results/compare.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
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


def plain_loop(client, run_ids: list[str]):
    """Fetch every run with get_run and build the run table the simple way; return it."""
    import pandas as pd

    rows = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        tags = run.data.tags
        rows.append({"run_id": run_id, "status": run.info.status, "task": tags.get("task"), "model": tags.get("model"), "granularity": tags.get("granularity"), "patch_size": tags.get("patch_size"), "seed": run.data.params.get("seed"), **run.data.metrics})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="number of synthetic runs (default: %(default)s)")
    parser.add_argument("--store", default=None, help="folder for the SQLite store and the report; an existing store is reused (default: a temporary folder)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "compare.json"), help="JSON file for the results")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    folder = Path(args.store or tempfile.mkdtemp(prefix="bench-compare-"))
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri

    from mlflow import MlflowClient

    from granularity.report.compare import compare
    from granularity.tracking.search import find_experiment_id, read_runs

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(EXPERIMENT)
    if existing is None:
        experiment_id = client.create_experiment(EXPERIMENT)
        started = time.perf_counter()
        run_ids = log_runs(client, experiment_id, args.runs)
        log_s = time.perf_counter() - started
        print(f"logged {len(run_ids)} runs in {log_s:.1f} s", flush=True)
    else:
        # A store kept from an earlier run (--store) is reused, so the slow logging step runs once.
        run_ids = [run.info.run_id for run in client.search_runs([existing.experiment_id], "tags.task != 'compare'", max_results=50000)]
        log_s = float("nan")
        print(f"reusing {len(run_ids)} runs of {folder}", flush=True)

    started = time.perf_counter()
    loop_table = plain_loop(client, run_ids)
    loop_s = time.perf_counter() - started
    print(f"plain get_run loop: {loop_s:.2f} s", flush=True)

    started = time.perf_counter()
    read_table = read_runs(client, find_experiment_id(client, EXPERIMENT))
    read_s = time.perf_counter() - started
    print(f"paged read alone: {read_s:.2f} s", flush=True)

    started = time.perf_counter()
    result = compare(EXPERIMENT, folder / "report", client=client)
    compare_s = time.perf_counter() - started
    print(f"compare (tables, figures, logged run): {compare_s:.2f} s", flush=True)

    if len(loop_table) != len(read_table.runs) or len(result.run_table.runs) != len(run_ids):
        print(f"run counts differ: loop {len(loop_table)}, read {len(read_table.runs)}, compare {len(result.run_table.runs)}", file=sys.stderr)
        return 1

    record = {
        "runs": len(run_ids),
        "log_s": round(log_s, 2),
        "loop_s": round(loop_s, 3),
        "read_s": round(read_s, 3),
        "compare_s": round(compare_s, 3),
        "loop_over_compare": round(loop_s / compare_s, 2),
        "loop_over_read": round(loop_s / read_s, 2),
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
