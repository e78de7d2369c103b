"""Fig. 3 of the study: classification F1 per granularity and patch size, one panel per model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from granularity.report.tables import GRANULARITY_ORDER

GRANULARITY_COLORS = {"bd": "#1f77b4", "el": "#ff7f0e", "pw": "#2ca02c"}


def load_pyplot():
    """Import and return matplotlib.pyplot with the Agg backend.

    compare runs headless, on servers and in CI. The import is deferred to the
    first figure because it costs about half a second, which commands that
    only import this package should not pay.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fig3(table2_cells: pd.DataFrame, path: Path) -> Path:
    """Draw mean F1 (%) over seeds against patch size, one line per granularity with ± 1 std bars, one panel per model.

    ``table2_cells`` is ``table2_classification(...).cells``. Without
    classification runs the figure says so instead of staying blank.
    """
    plt = load_pyplot()
    cells = table2_cells[table2_cells["metric"] == "F1"] if not table2_cells.empty else table2_cells
    models = list(dict.fromkeys(cells["model"])) if not cells.empty else []
    # At least 7 inches wide, so the title fits above a single panel.
    width = max(4.2 * max(len(models), 1), 7.0)
    figure, axes = plt.subplots(1, max(len(models), 1), figsize=(width, 3.6), squeeze=False, sharey=True)

    if not models:
        axes[0, 0].text(0.5, 0.5, "no finished classification runs", ha="center", va="center")
        axes[0, 0].set_axis_off()

    for axis, model in zip(axes[0], models):
        model_cells = cells[cells["model"] == model]
        granularities = sorted(set(model_cells["granularity"]), key=lambda g: (GRANULARITY_ORDER + (g,)).index(g))
        for position, granularity in enumerate(granularities):
            line = model_cells[model_cells["granularity"] == granularity].groupby("patch_size", as_index=False).agg(
                mean=("mean", "mean"), std=("std", "mean")
            )
            # Shift each granularity sideways by a few percent of a patch-size step, so the error bars of one patch size do not hide each other.
            shift = 2.0 ** (0.05 * (position - (len(granularities) - 1) / 2))
            axis.errorbar(
                line["patch_size"].to_numpy(float) * shift,
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
    # Fixed margins in inches: tight_layout would draw the figure once more only to measure its labels.
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=0.75 / width, right=1 - 0.12 / width, bottom=0.58 / height, top=1 - 0.65 / height, wspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
