"""The study's result tables (II, III and IV) rebuilt from the run table: mean, standard deviation and n over seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from granularity.tracking.search import CLASS_ACCURACY_PREFIX, TASK_CLASSIFICATION, TASK_SEGMENTATION

GRANULARITY_ORDER = ("bd", "el", "pw")

CLASSIFICATION_TABLE_METRICS = {"test_precision": "precision", "test_recall": "recall", "test_f1": "F1"}

# Table IV columns with the scale they are printed in: the study prints accuracy and recalls in percent, Dice as a fraction.
SEGMENTATION_TABLE_METRICS = {
    "test_pixel_accuracy": ("pixel accuracy %", 100.0),
    "test_dice": ("Dice", 1.0),
    "test_nuclei_recall": ("nuclei recall %", 100.0),
    "test_cancer_recall": ("cancer recall %", 100.0),
    "test_detection_f1": ("detection F1", 1.0),
    "test_pq": ("PQ", 1.0),
}


@dataclass
class ResultTable:
    """One result table: ``cells`` contains one row per table cell (keys, mean, std, n, best) in the printed unit.

    ``row_keys`` and ``column_keys`` name the columns of ``cells`` that form the
    printed table's rows and columns; ``title`` and ``note`` go above and below it.
    ``show_spread`` off prints the mean alone (for published single values).
    """

    name: str
    title: str
    cells: pd.DataFrame
    row_keys: list[str]
    column_keys: list[str]
    note: str = ""
    decimals: int = 2
    show_spread: bool = True
    mark_best: bool = True


def _granularity_rank(values: pd.Series) -> pd.Series:
    order = {name: index for index, name in enumerate(GRANULARITY_ORDER)}
    return values.map(lambda value: order.get(value, len(order)))


def summarise(runs: pd.DataFrame, keys: list[str], metric: str, scale: float) -> pd.DataFrame:
    """Return mean, sample standard deviation (ddof=1, NaN for one run) and n of ``metric`` per group of ``keys``.

    Values are multiplied by ``scale`` first (100 for percent).
    """
    values = runs[keys].copy()
    values["value"] = runs[metric].astype(float) * scale
    grouped = values.groupby(keys, sort=False)["value"]
    # pandas' built-in std is the sample deviation (ddof=1), NaN for one run, without a Python call per group.
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    summary["n"] = summary["n"].astype(int)
    return summary


def mark_best(cells: pd.DataFrame, group_keys: list[str]) -> pd.DataFrame:
    """Set ``best`` on the cell with the highest mean in each group; ties mark every tied cell."""
    best_mean = cells.groupby(group_keys, sort=False)["mean"].transform("max")
    return cells.assign(best=np.isclose(cells["mean"], best_mean, rtol=0.0, atol=1e-12))


def _sorted_cells(cells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    sort_columns = []
    frame = cells.copy()
    for key in keys:
        if key == "granularity":
            frame["_granularity_rank"] = _granularity_rank(frame["granularity"])
            sort_columns.append("_granularity_rank")
        elif key in ("metric", "class"):
            continue  # keep the order the metrics were listed in
        else:
            sort_columns.append(key)
    frame = frame.sort_values(sort_columns, kind="stable") if sort_columns else frame
    return frame.drop(columns=["_granularity_rank"], errors="ignore").reset_index(drop=True)


def _dataset_keys(runs: pd.DataFrame) -> list[str]:
    # The dataset becomes a row level only when the runs cover more than one.
    return ["dataset"] if runs["dataset"].nunique() > 1 else []


def table2_classification(runs: pd.DataFrame) -> ResultTable:
    """Build Table II: rows patch size x metric (precision, recall, F1), columns model x granularity, in percent."""
    classification = runs[runs["task"] == TASK_CLASSIFICATION]
    dataset_keys = _dataset_keys(classification) if not classification.empty else []
    group_keys = dataset_keys + ["patch_size", "model", "granularity"]
    parts = []
    for metric, label in CLASSIFICATION_TABLE_METRICS.items():
        if classification.empty:
            break
        summary = summarise(classification, group_keys, metric, 100.0)
        summary.insert(len(dataset_keys) + 1, "metric", label)
        parts.append(summary)
    cells = _combine(parts, dataset_keys + ["patch_size", "metric", "model", "granularity"])
    cells = mark_best(cells, dataset_keys + ["patch_size", "metric", "model"]) if not cells.empty else cells.assign(best=[])
    return ResultTable(
        name="table2_classification",
        title="Table II. Patch classification on the pixel-wise test patches: precision, recall and F1 (macro over classes, %)",
        cells=_sorted_cells(cells, dataset_keys + ["patch_size", "metric", "model", "granularity"]),
        row_keys=dataset_keys + ["patch_size", "metric"],
        column_keys=["model", "granularity"],
        note="Each cell: mean ± sample standard deviation over seeds (n runs). Of each model, the granularity with the highest mean is marked.",
    )


def class_names(runs: pd.DataFrame) -> list[str]:
    """Return the class names of the ``test_class_accuracy_<class name>`` metrics present in ``runs``, sorted."""
    return sorted(column[len(CLASS_ACCURACY_PREFIX) :] for column in runs.columns if column.startswith(CLASS_ACCURACY_PREFIX))


def table3_class_accuracy(runs: pd.DataFrame) -> ResultTable:
    """Build Table III: rows patch size x class, columns model x granularity, accuracy of each class (its recall) in percent."""
    classification = runs[runs["task"] == TASK_CLASSIFICATION]
    dataset_keys = _dataset_keys(classification) if not classification.empty else []
    group_keys = dataset_keys + ["patch_size", "model", "granularity"]
    parts = []
    for name in class_names(classification):
        metric = CLASS_ACCURACY_PREFIX + name
        present = classification[classification[metric].notna()]
        summary = summarise(present, group_keys, metric, 100.0)
        summary.insert(len(dataset_keys) + 1, "class", name)
        parts.append(summary)
    cells = _combine(parts, dataset_keys + ["patch_size", "class", "model", "granularity"])
    cells = mark_best(cells, dataset_keys + ["patch_size", "class", "model"]) if not cells.empty else cells.assign(best=[])
    return ResultTable(
        name="table3_class_accuracy",
        title="Table III. Accuracy per class (recall of the class, %) on the pixel-wise test patches",
        cells=_sorted_cells(cells, dataset_keys + ["patch_size", "class", "model", "granularity"]),
        row_keys=dataset_keys + ["patch_size", "class"],
        column_keys=["model", "granularity"],
        note="Each cell: mean ± sample standard deviation over seeds (n runs). Of each model, the granularity with the highest mean is marked.",
    )


def table4_segmentation(runs: pd.DataFrame) -> ResultTable:
    """Build Table IV: rows model x granularity, columns the segmentation metrics against the pixel-wise truth."""
    segmentation = runs[runs["task"] == TASK_SEGMENTATION]
    dataset_keys = _dataset_keys(segmentation) if not segmentation.empty else []
    group_keys = dataset_keys + ["model", "granularity"]
    parts = []
    for metric, (label, scale) in SEGMENTATION_TABLE_METRICS.items():
        if segmentation.empty:
            break
        summary = summarise(segmentation, group_keys, metric, scale)
        summary["metric"] = label
        parts.append(summary)
    cells = _combine(parts, dataset_keys + ["model", "granularity", "metric"])
    cells = mark_best(cells, dataset_keys + ["model", "metric"]) if not cells.empty else cells.assign(best=[])
    return ResultTable(
        name="table4_segmentation",
        title="Table IV. Semantic segmentation of the test regions against the pixel-wise truth",
        cells=_sorted_cells(cells, dataset_keys + ["model", "granularity", "metric"]),
        row_keys=dataset_keys + ["model", "granularity"],
        column_keys=["metric"],
        note=(
            "Each cell: mean ± sample standard deviation over seeds (n runs). Accuracy and recalls in %, Dice, "
            "detection F1 and PQ as fractions. Of each model, the granularity with the highest mean in each column is marked."
        ),
    )


def _combine(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=columns + ["mean", "std", "n"])
    return pd.concat(parts, ignore_index=True)[columns + ["mean", "std", "n"]]
