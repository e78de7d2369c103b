"""Artifacts of a classification run: the per-patch prediction table and the confusion-matrix figure."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def predictions_table(
    windows: pd.DataFrame,
    region_names: Sequence[str],
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> pd.DataFrame:
    """Return one row per test window: region name, x, y, size, true and predicted label, one probability per class.

    Labels are class names; the probability columns are ``probability_<class name>``.
    """
    names = np.asarray(class_names, dtype=object)
    predicted = probabilities.argmax(axis=1)
    table = pd.DataFrame(
        {
            "region": np.asarray(region_names, dtype=object)[windows["region"].to_numpy()],
            "x": windows["x"].to_numpy(),
            "y": windows["y"].to_numpy(),
            "size": windows["size"].to_numpy(),
            "true_label": names[windows["label"].to_numpy()],
            "predicted_label": names[predicted],
        }
    )
    for index, name in enumerate(class_names):
        table[f"probability_{name}"] = probabilities[:, index]
    return table


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str], title: str):
    """Return a matplotlib figure with the counts and the row-normalised confusion matrix side by side.

    Rows are true classes and columns predicted classes. A row without
    patches is shown as 0 in the normalised panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)

    size = 2.2 + 0.9 * len(class_names)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), constrained_layout=True)
    panels = ((axes[0], counts, "counts", "d"), (axes[1], normalised, "row-normalised (recall)", ".2f"))
    for axis, values, label, number_format in panels:
        image = axis.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9) if label == "counts" else 1.0)
        axis.set_title(label)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        axis.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
        axis.set_yticks(range(len(class_names)), class_names)
        threshold = values.max() / 2 if values.max() > 0 else 0.5
        for row in range(values.shape[0]):
            for column in range(values.shape[1]):
                value = values[row, column]
                axis.text(
                    column,
                    row,
                    format(value, number_format),
                    ha="center",
                    va="center",
                    color="white" if value > threshold else "black",
                )
        figure.colorbar(image, ax=axis, shrink=0.8)
    figure.suptitle(title)
    return figure
