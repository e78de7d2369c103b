"""Read the training runs of an experiment into one table, page by page, and list the runs left out.

Only the tags and metric names that ``classify`` and ``segment`` log are used,
so runs logged by any other means with the same names are read alike.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import pandas as pd

from granularity.errors import UserError
from granularity.tracking.keys import (
    TAG_CONFIG_KEY,
    TAG_DATASET,
    TAG_GRANULARITY,
    TAG_MODEL,
    TAG_PATCH_SIZE,
    TAG_SEED,
    TAG_TASK,
)

logger = logging.getLogger(__name__)

TASK_CLASSIFICATION = "classification"
TASK_SEGMENTATION = "segmentation"
TRAINING_TASKS = (TASK_CLASSIFICATION, TASK_SEGMENTATION)

# Runs of these tasks belong to the bookkeeping of a study, not to its results, so they are skipped without a note.
BOOKKEEPING_TASKS = frozenset({"prepare", "study", "compare", "sweep"})

PARENT_RUN_TAG = "mlflow.parentRunId"

# Runs per search_runs call. Every call repeats the query and its commit, so
# larger pages cost less per run; MLflow's SQL store accepts up to 50,000.
PAGE_SIZE = 10000

CLASSIFICATION_METRICS = ("test_precision", "test_recall", "test_f1", "test_accuracy")
CLASS_ACCURACY_PREFIX = "test_class_accuracy_"
SEGMENTATION_METRICS = (
    "test_pixel_accuracy",
    "test_dice",
    "test_nuclei_recall",
    "test_cancer_recall",
    "test_detection_f1",
    "test_pq",
)

# Columns of the run table besides the metric columns.
RUN_COLUMNS = (
    "run_id", "run_name", "status", "start_time", "artifact_uri", "parent_run_id",
    "task", "dataset", "model", "granularity", "patch_size", "seed", "config_key",
)


@dataclass(frozen=True)
class LeftOutRun:
    """A run that compare did not use, and why."""

    run_id: str
    run_name: str
    reason: str


@dataclass
class RunTable:
    """The compared runs (one row each, metrics as float columns) and the runs left out."""

    runs: pd.DataFrame
    left_out: list[LeftOutRun]

    def left_out_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(run) for run in self.left_out], columns=["run_id", "run_name", "reason"])


def find_experiment_id(client, experiment: str) -> str:
    """Return the id of the experiment called ``experiment``; raise a UserError naming the fix when it does not exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(
            f"experiment {experiment!r} not found in the tracking store; pass --experiment with one of {names} "
            "or run `granularity study` first"
        )
    return found.experiment_id


@contextmanager
def garbage_collection_paused():
    """Pause Python's cyclic garbage collector inside the block, restoring its previous state after.

    Loading a page of runs allocates tens of thousands of ORM objects and no
    cycles worth collecting; the collector's passes over them took more than
    half of the reading time of 2,000 runs from SQLite (see BENCHMARKS.md).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def iter_runs(client, experiment_id: str, filter_string: str = "", page_size: int = PAGE_SIZE):
    """Yield every run of the experiment that matches ``filter_string``, fetched ``page_size`` runs at a time."""
    page_token = None
    while True:
        with garbage_collection_paused():
            page = client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                max_results=page_size,
                order_by=["attributes.start_time ASC"],
                page_token=page_token,
            )
        yield from page
        page_token = page.token
        if not page_token:
            return


def _seed_of(run) -> str | None:
    # Training runs log the seed as a parameter; a tag is accepted for runs logged by hand.
    return run.data.params.get("seed", run.data.tags.get(TAG_SEED))


def _required_metrics(task: str, class_metrics: list[str]) -> list[str]:
    if task == TASK_CLASSIFICATION:
        return list(CLASSIFICATION_METRICS) + class_metrics
    return list(SEGMENTATION_METRICS)


def _missing_tags(row: dict) -> list[str]:
    required = [TAG_GRANULARITY, TAG_MODEL, TAG_DATASET, "seed"]
    if row["task"] == TASK_CLASSIFICATION:
        required.append(TAG_PATCH_SIZE)
    return [name for name in required if row.get(name) in (None, "")]


def read_runs(client, experiment_id: str, parent_run_id: str | None = None, page_size: int = PAGE_SIZE) -> RunTable:
    """Read the training runs of an experiment, or only the children of ``parent_run_id``, into a RunTable.

    A run is left out, with its reason, when it is not FINISHED, lacks a tag
    that places it in a table (granularity, model, dataset, seed, and patch
    size for classification), lacks a compared metric or is NaN there, or
    repeats the ``config_key`` of a later finished run (the later one is kept,
    so a configuration run twice is not counted as two seeds). The per-class
    accuracy metrics a classification run must have are those that any
    classification run of the same dataset logged.
    """
    filter_string = f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    return build_run_table(iter_runs(client, experiment_id, filter_string, page_size))


def build_run_table(runs: Iterable) -> RunTable:
    """Build the RunTable of ``read_runs`` from MLflow ``Run`` objects, however they were fetched."""
    rows: list[dict] = []
    left_out: list[LeftOutRun] = []

    for run in runs:
        tags = run.data.tags
        task = tags.get(TAG_TASK)
        if task in BOOKKEEPING_TASKS:
            continue
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name or "",
            "status": run.info.status,
            "start_time": run.info.start_time or 0,
            "artifact_uri": run.info.artifact_uri,
            "parent_run_id": tags.get(PARENT_RUN_TAG),
            "task": task,
            "dataset": tags.get(TAG_DATASET),
            "model": tags.get(TAG_MODEL),
            "granularity": tags.get(TAG_GRANULARITY),
            "patch_size": tags.get(TAG_PATCH_SIZE),
            "seed": _seed_of(run),
            "config_key": tags.get(TAG_CONFIG_KEY),
        }
        if task not in TRAINING_TASKS:
            left_out.append(LeftOutRun(row["run_id"], row["run_name"], f"tag task is {task!r}, not one of {list(TRAINING_TASKS)}"))
            continue
        if run.info.status != "FINISHED":
            left_out.append(LeftOutRun(row["run_id"], row["run_name"], f"status {run.info.status}, not FINISHED"))
            continue
        missing = _missing_tags(row)
        if missing:
            left_out.append(LeftOutRun(row["run_id"], row["run_name"], f"tags or params missing: {', '.join(missing)}"))
            continue
        row.update(run.data.metrics)
        rows.append(row)

    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS) if not rows else None)
    if runs.empty:
        return RunTable(runs, left_out)

    keep = pd.Series(True, index=runs.index)
    for (task, dataset), group in runs.groupby(["task", "dataset"]):
        class_metrics = sorted(c for c in group.columns if c.startswith(CLASS_ACCURACY_PREFIX) and group[c].notna().any())
        required = _required_metrics(task, class_metrics if task == TASK_CLASSIFICATION else [])
        values = group.reindex(columns=required)
        absent = values.isna()
        for index in absent.index[absent.any(axis=1)]:
            missing = [name for name in required if absent.at[index, name]]
            keep[index] = False
            left_out.append(LeftOutRun(group.at[index, "run_id"], group.at[index, "run_name"], f"metrics missing or NaN: {', '.join(missing)}"))
    runs = runs[keep]

    runs = _drop_repeated_configurations(runs, left_out)
    runs = runs.assign(seed=runs["seed"].astype(str))
    if "patch_size" in runs:
        runs = runs.assign(patch_size=pd.to_numeric(runs["patch_size"], errors="coerce"))
    logger.info("read %d compared runs, left out %d", len(runs), len(left_out))
    return RunTable(runs.reset_index(drop=True), left_out)


def _drop_repeated_configurations(runs: pd.DataFrame, left_out: list[LeftOutRun]) -> pd.DataFrame:
    keyed = runs[runs["config_key"].notna()].sort_values("start_time")
    latest = keyed.drop_duplicates("config_key", keep="last")
    repeated = keyed.index.difference(latest.index)
    latest_by_key = dict(zip(latest["config_key"], latest["run_id"]))
    for index in repeated:
        row = runs.loc[index]
        left_out.append(
            LeftOutRun(row["run_id"], row["run_name"], f"same config_key as the later run {latest_by_key[row['config_key']]}")
        )
    return runs.drop(index=repeated)
