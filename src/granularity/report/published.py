"""The published Tables II to IV of the annotation-granularity study, transcribed as data.

Source: J. Shi, Z. Gao, H. Zhang, P. Puttapirat, C. Wang, X. Zhang, C. Li,
"Effects of annotation granularity in deep learning models for
histopathological images" (IEEE conference paper, about 2020). One run per
cell, on a private ccRCC dataset with classes 0 = normal, 1 = ISUP grade 1,
2 = ISUP grade 2; the values are in the units the paper prints.
"""

from __future__ import annotations

import pandas as pd

from granularity.report.tables import ResultTable

CITATION = (
    'J. Shi et al., "Effects of annotation granularity in deep learning models for histopathological images", '
    "IEEE conference paper, about 2020"
)

MODELS = ("VGG16", "ResNet18", "MobileNet")
GRANULARITIES = ("bd", "el", "pw")

# Table II: (patch size, metric) -> values for VGG16 bd, el, pw, ResNet18 bd, el, pw, MobileNet bd, el, pw (%).
TABLE2 = {
    (32, "precision"): (85.49, 88.59, 92.04, 87.68, 89.88, 93.55, 87.27, 89.47, 94.25),
    (32, "recall"): (83.47, 88.79, 92.30, 88.05, 90.11, 93.73, 87.65, 89.83, 94.40),
    (32, "F1"): (84.85, 88.64, 92.14, 87.79, 89.97, 93.62, 87.41, 89.62, 94.32),
    (64, "precision"): (92.08, 93.38, 94.77, 88.03, 89.21, 92.03, 83.85, 86.96, 91.06),
    (64, "recall"): (92.09, 93.40, 94.77, 88.07, 89.24, 92.08, 83.93, 87.03, 91.13),
    (64, "F1"): (92.07, 93.38, 94.77, 88.04, 89.20, 92.04, 83.80, 86.95, 91.06),
    (128, "precision"): (79.79, 85.09, 87.66, 74.95, 78.22, 79.55, 77.31, 78.84, 80.16),
    (128, "recall"): (79.83, 85.04, 87.65, 74.99, 78.06, 79.63, 77.36, 78.88, 80.20),
    (128, "F1"): (79.80, 85.06, 87.65, 74.95, 78.06, 79.56, 77.28, 78.85, 80.16),
}

# Table III: (patch size, class) -> accuracy per class in %, columns as in Table II.
TABLE3 = {
    (32, "0 normal"): (89.03, 94.07, 95.99, 92.38, 94.52, 96.68, 92.30, 93.96, 96.90),
    (32, "1 grade 1"): (65.51, 67.53, 67.29, 74.48, 72.93, 75.15, 74.43, 74.04, 78.92),
    (32, "2 grade 2"): (61.30, 65.61, 65.43, 72.27, 68.59, 72.08, 68.00, 66.79, 73.86),
    (64, "0 normal"): (92.92, 94.54, 96.55, 90.20, 91.37, 93.82, 85.33, 89.55, 93.27),
    (64, "1 grade 1"): (91.47, 93.23, 93.08, 86.94, 87.20, 90.04, 82.97, 84.43, 88.34),
    (64, "2 grade 2"): (91.18, 90.28, 91.28, 84.82, 86.72, 89.09, 81.92, 84.23, 87.94),
    (128, "0 normal"): (72.33, 78.28, 84.41, 67.65, 70.80, 74.61, 70.25, 72.02, 76.93),
    (128, "1 grade 1"): (81.22, 87.09, 89.12, 77.81, 81.05, 81.20, 77.62, 80.63, 81.71),
    (128, "2 grade 2"): (80.87, 85.58, 87.48, 74.23, 78.52, 79.61, 79.58, 79.56, 79.84),
}

# Table IV: (model, granularity) -> pixel accuracy %, Dice (fraction), nuclei recall %, cancer recall %.
TABLE4_METRICS = ("pixel accuracy %", "Dice", "nuclei recall %", "cancer recall %")
TABLE4 = {
    ("UNet", "pw"): (95.79, 0.94, 95.45, 75.96),
    ("UNet", "el"): (92.44, 0.89, 93.43, 74.54),
    ("UNet", "bd"): (89.58, 0.86, 94.94, 75.30),
    ("FPN", "pw"): (95.32, 0.93, 94.33, 74.20),
    ("FPN", "el"): (91.58, 0.88, 91.03, 71.21),
    ("FPN", "bd"): (88.84, 0.85, 93.09, 71.33),
    ("LinkNet", "pw"): (94.94, 0.93, 92.24, 69.94),
    ("LinkNet", "el"): (91.08, 0.87, 90.44, 67.74),
    ("LinkNet", "bd"): (86.61, 0.80, 92.40, 63.59),
}

# The paper's headline claims, in its own words; it does not say over which baseline the averages run.
HEADLINE_CLAIMS = (
    "Pixel-wise annotation improves classification precision, recall and F1 by 7.87 %, 8.83 % and 7.85 % on average, "
    "and segmentation accuracy by 8.33 %."
)


def _grid_cells(table: dict, row_names: tuple[str, str]) -> pd.DataFrame:
    records = []
    for (patch_size, row), values in table.items():
        for index, value in enumerate(values):
            model = MODELS[index // len(GRANULARITIES)]
            granularity = GRANULARITIES[index % len(GRANULARITIES)]
            records.append({row_names[0]: patch_size, row_names[1]: row, "model": model, "granularity": granularity, "mean": value})
    return pd.DataFrame(records)


def _with_single_run(cells: pd.DataFrame, group_keys: list[str]) -> pd.DataFrame:
    best_mean = cells.groupby(group_keys, sort=False)["mean"].transform("max")
    return cells.assign(std=float("nan"), n=1, best=cells["mean"] == best_mean)


def published_tables() -> list[ResultTable]:
    """Return the published Tables II, III and IV, the best granularity of each model marked as in the measured tables."""
    source = f"Published values, one run per cell, from {CITATION}."
    table2 = _with_single_run(_grid_cells(TABLE2, ("patch_size", "metric")), ["patch_size", "metric", "model"])
    table3 = _with_single_run(_grid_cells(TABLE3, ("patch_size", "class")), ["patch_size", "class", "model"])

    records = []
    for (model, granularity), values in TABLE4.items():
        for metric, value in zip(TABLE4_METRICS, values):
            records.append({"model": model, "granularity": granularity, "metric": metric, "mean": value})
    table4 = _with_single_run(pd.DataFrame(records), ["model", "metric"])

    return [
        ResultTable("published_table2", "Published Table II. Classification precision, recall and F1 (%)", table2,
                    ["patch_size", "metric"], ["model", "granularity"], source, show_spread=False),
        ResultTable("published_table3", "Published Table III. Accuracy per class (%)", table3,
                    ["patch_size", "class"], ["model", "granularity"], source, show_spread=False),
        ResultTable("published_table4", "Published Table IV. Segmentation", table4,
                    ["model", "granularity"], ["metric"], f"{source} Headline claims: {HEADLINE_CLAIMS}", show_spread=False),
    ]
