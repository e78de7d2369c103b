"""Fig. 3 of the study: classification F1 per granularity and patch size, one panel per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # compare runs headless, on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from granularity.report.tables import GRANULARITY_ORDER

GRANULARITY_COLORS = {"bd": "#1f77b4", "el": "#ff7f0e", "pw": "#2ca02c"}


def plot_fig3(table2_cells: pd.DataFrame, path: Path) -> Path:
    """Draw mean F1 (%) over seeds against patch size, one line per granularity with ± 1 std bars, one panel per model.

    ``table2_cells`` is ``table2_classification(...).cells``. Without
    classification runs the figure says so instead of staying blank.
    """
    cells = table2_cells[table2_cells["metric"] == "F1"] if not table2_cells.empty else table2_cells
    models = list(dict.fromkeys(cells["model"])) if not cells.empty else []
    figure, axes = plt.subplots(1, max(len(models), 1), figsize=(4.2 * max(len(models), 1), 3.6), squeeze=False, sharey=True)

    if not models:
        axes[0, 0].text(0.5, 0.5, "no finished classification runs", ha="center", va="center")
        axes[0, 0].set_axis_off()

    for axis, model in zip(axes[0], models):
        model_cells = cells[cells["model"] == model]
        granularities = sorted(set(model_cells["granularity"]), key=lambda g: (GRANULARITY_ORDER + (g,)).index(g))
        for granularity in granularities:
            line = model_cells[model_cells["granularity"] == granularity].groupby("patch_size", as_index=False).agg(
                mean=("mean", "mean"), std=("std", "mean")
            )
            axis.errorbar(
                line["patch_size"],
                line["mean"],
                yerr=np.nan_to_num(line["std"].to_numpy(float)),
                marker="o",
                capsize=3,
                label=granularity,
                color=GRANULARITY_COLORS.get(granularity),
            )
        patch_sizes = sorted(set(model_cells["patch_size"]))
        axis.set_xscale("log", base=2)
        axis.set_xticks(patch_sizes, [str(int(size)) for size in patch_sizes])
        axis.set_xticks([], minor=True)
        axis.set_title(str(model))
        axis.set_xlabel("patch size (px)")
        axis.grid(alpha=0.3)
        axis.legend(title="granularity")

    axes[0, 0].set_ylabel("F1 (%), mean ± std over seeds")
    figure.suptitle("Fig. 3. Classification F1 per annotation granularity and patch size")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
