"""Gain of pixel-wise annotation over ellipses and boxes: mean over paired runs, 95 % confidence interval, paired t-test.

Pairs: a pw run and a baseline run (el or bd) form a pair when they share the
dataset, the model, the seed and, for classification, the patch size. Each
pair gives one difference pw - baseline, in percentage points (metrics are
stored as fractions 0..1). A run without a partner is left out of the pairs.
The interval is the t-interval of the mean difference; the p-value is
``scipy.stats.ttest_rel`` (two-sided) on the paired values. Both need two
pairs or more and are NaN otherwise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from granularity.tracking.search import CLASS_ACCURACY_PREFIX, CLASSIFICATION_METRICS, SEGMENTATION_METRICS, TASK_CLASSIFICATION, TASK_SEGMENTATION

BASELINES = ("el", "bd")
PAIR_KEYS = {
    TASK_CLASSIFICATION: ["dataset", "model", "patch_size", "seed"],
    TASK_SEGMENTATION: ["dataset", "model", "seed"],
}
COLUMNS = ["task", "metric", "baseline", "pairs", "mean_gain", "ci_low", "ci_high", "t", "p_value"]


def compared_metrics(runs: pd.DataFrame, task: str) -> list[str]:
    """Return the metrics the improvement table covers for ``task``, in print order."""
    if task == TASK_CLASSIFICATION:
        class_metrics = sorted(c for c in runs.columns if c.startswith(CLASS_ACCURACY_PREFIX))
        return list(CLASSIFICATION_METRICS) + class_metrics
    return list(SEGMENTATION_METRICS)


def paired_runs(runs: pd.DataFrame, task: str, baseline: str, metrics: list[str]) -> pd.DataFrame:
    """Return one row per pair of a pw run and a ``baseline`` run, with ``<metric>_pw`` and ``<metric>_base`` columns."""
    keys = PAIR_KEYS[task]
    task_runs = runs[runs["task"] == task].reindex(columns=keys + ["granularity"] + metrics)
    pixel_wise = task_runs[task_runs["granularity"] == "pw"].drop(columns="granularity")
    other = task_runs[task_runs["granularity"] == baseline].drop(columns="granularity")
    return pixel_wise.merge(other, on=keys, suffixes=("_pw", "_base"))


def paired_values(pairs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the (pw, baseline) values of ``metric`` in percentage points, for the pairs where both have it."""
    both = pairs[[f"{metric}_pw", f"{metric}_base"]].dropna()
    return both[f"{metric}_pw"].to_numpy(float) * 100.0, both[f"{metric}_base"].to_numpy(float) * 100.0


def paired_gain(pixel_wise: np.ndarray, base: np.ndarray, confidence: float = 0.95) -> dict:
    """Return the mean of pw - base, its confidence interval, and the paired t statistic and p-value."""
    # Imported here: scipy.stats takes about a second to import, and only this function needs it.
    from scipy import stats

    differences = pixel_wise - base
    count = len(differences)
    result = {"pairs": count, "mean_gain": float(differences.mean()) if count else np.nan, "ci_low": np.nan, "ci_high": np.nan, "t": np.nan, "p_value": np.nan}
    if count < 2:
        return result

    standard_error = differences.std(ddof=1) / np.sqrt(count)
    half_width = stats.t.ppf(0.5 + confidence / 2, df=count - 1) * standard_error
    result["ci_low"] = result["mean_gain"] - half_width
    result["ci_high"] = result["mean_gain"] + half_width

    # Identical differences have zero variance: the test is undefined and scipy returns NaN, which is kept.
    test = stats.ttest_rel(pixel_wise, base)
    result["t"] = float(test.statistic)
    result["p_value"] = float(test.pvalue)
    return result


def improvement_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per task, metric and baseline with the pw gain in percentage points."""
    rows = []
    for task in (TASK_CLASSIFICATION, TASK_SEGMENTATION):
        if runs.empty or not (runs["task"] == task).any():
            continue
        metrics = compared_metrics(runs, task)
        pairs = {baseline: paired_runs(runs, task, baseline, metrics) for baseline in BASELINES}
        for metric in metrics:
            for baseline in BASELINES:
                pixel_wise, base = paired_values(pairs[baseline], metric)
                rows.append({"task": task, "metric": metric, "baseline": baseline, **paired_gain(pixel_wise, base)})
    return pd.DataFrame(rows, columns=COLUMNS)


def printed_improvement(table: pd.DataFrame) -> pd.DataFrame:
    """Format the improvement table for Markdown and HTML: gains with two decimals, p-values with three significant digits."""

    def number(value: float, spec: str) -> str:
        return "—" if pd.isna(value) else format(value, spec)

    return pd.DataFrame(
        {
            "task": table["task"],
            "metric": table["metric"],
            "pw over": table["baseline"],
            "pairs": table["pairs"].astype(int),
            "mean gain (points)": [number(v, "+.2f") for v in table["mean_gain"]],
            "95 % CI": [f"[{number(low, '+.2f')}, {number(high, '+.2f')}]" for low, high in zip(table["ci_low"], table["ci_high"])],
            "paired t-test p": [number(v, ".3g") for v in table["p_value"]],
        }
    )
