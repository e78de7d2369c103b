"""Which windows a classification run trains, validates and tests on.

- Train and validation: windows of the run's own granularity from the train
  and validation subsets, balanced to one count per class (capped by
  ``max_patches_per_class``).
- Test: the pixel-wise (``pw``) windows of the test subset, the same patches
  and labels for every granularity, so runs of different granularities are
  scored on one ground truth. ``own_test`` contains the run's own-granularity
  windows of the test subset. Neither is balanced.

With ``split="region"`` the subsets are drawn over region groups (slides or
tiles), so overlapping windows never straddle two subsets. With
``split="patch"`` they are drawn over window positions (region, x, y), taken
from the windows of every granularity, so one position falls into the same
subset at every granularity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from granularity.data.balance import EmptyClassError, balance_classes
from granularity.data.prepared import PreparedDataset
from granularity.data.splits import split_by_group, split_windows
from granularity.errors import ConfigError, UserError
from granularity.training.classification_config import SPLIT_FRACTIONS

logger = logging.getLogger(__name__)

SUBSETS = ("train", "val", "test")
POSITION = ["region", "x", "y"]


@dataclass
class ClassificationWindows:
    """The window tables of one run (columns region, x, y, size, label)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    own_test: pd.DataFrame
    class_names: list[str]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test), "own_test": len(self.own_test)}

    def combined(self, region_names: list[str]) -> pd.DataFrame:
        """Return all four tables in one, with ``subset`` and ``region_name`` columns, for the dataset input."""
        parts = []
        for subset, table in (("train", self.train), ("val", self.val), ("test", self.test), ("own_test", self.own_test)):
            part = table.copy()
            part.insert(0, "subset", subset)
            part.insert(2, "region_name", np.asarray(region_names, dtype=object)[part["region"].to_numpy()])
            parts.append(part)
        return pd.concat(parts, ignore_index=True)


def _windows(prepared: PreparedDataset, patch_size: int, granularity: str) -> pd.DataFrame:
    key = (patch_size, granularity)
    if key not in prepared.windows:
        available = sorted({size for size, _ in prepared.windows})
        raise ConfigError(f"no windows of {patch_size} px in the prepared dataset {prepared.name} (sizes {available}); prepare it with this patch size")
    return prepared.windows[key]


def _subset_by_region(prepared: PreparedDataset, seed: int) -> dict[str, set[int]]:
    subsets = split_by_group(prepared.groups, SPLIT_FRACTIONS, seed)
    return {name: set(int(index) for index in subsets[name]) for name in SUBSETS}


def _position_subsets(prepared: PreparedDataset, patch_size: int, seed: int) -> pd.DataFrame:
    """Return every window position of ``patch_size`` at any granularity with its subset."""
    tables = [table[POSITION] for (size, _), table in prepared.windows.items() if size == patch_size]
    positions = pd.concat(tables, ignore_index=True).drop_duplicates().sort_values(POSITION, ignore_index=True)
    subsets = split_windows(len(positions), SPLIT_FRACTIONS, seed)
    subset_column = np.empty(len(positions), dtype=object)
    for name in SUBSETS:
        subset_column[np.asarray(subsets[name], dtype=np.int64)] = name
    positions["subset"] = subset_column
    return positions


def _select(table: pd.DataFrame, subset: str, regions: dict[str, set[int]] | None, positions: pd.DataFrame | None) -> pd.DataFrame:
    if regions is not None:
        return table[table["region"].isin(regions[subset])].reset_index(drop=True)
    merged = table.merge(positions, on=POSITION, how="left", validate="one_to_one")
    return merged[merged["subset"] == subset].drop(columns="subset").reset_index(drop=True)


def _balance(table: pd.DataFrame, subset: str, class_names: list[str], seed: int, max_per_class: int, allow_missing: bool = False) -> pd.DataFrame:
    labels = table["label"].to_numpy()
    if allow_missing:
        counts = np.bincount(labels, minlength=len(class_names))
        empty = [name for name, count in zip(class_names, counts) if count == 0]
        if empty:
            logger.warning(
                "the %s regions contain no %s window, so that class has no %s score; try another --seed or --split patch",
                subset, ", ".join(empty), subset,
            )
    try:
        indices = balance_classes(labels, len(class_names), seed, max_per_class, class_names=class_names, allow_missing=allow_missing)
    except EmptyClassError as error:
        raise EmptyClassError(f"{subset} windows: {error}") from error
    return table.iloc[np.sort(np.asarray(indices, dtype=np.int64))].reset_index(drop=True)


def select_windows(
    prepared: PreparedDataset,
    granularity: str,
    patch_size: int,
    split: str,
    seed: int,
    max_patches_per_class: int,
) -> ClassificationWindows:
    """Split and balance the windows of one run; raise UserError when a class is left empty for training."""
    class_names = list(prepared.class_map.names)
    own = _windows(prepared, patch_size, granularity)
    pixel_wise = _windows(prepared, patch_size, "pw")

    regions = _subset_by_region(prepared, seed) if split == "region" else None
    positions = _position_subsets(prepared, patch_size, seed) if split == "patch" else None

    train = _balance(_select(own, "train", regions, positions), "train", class_names, seed, max_patches_per_class)

    # A small validation subset may lack a class; the macro scores then leave that class out.
    val = _balance(_select(own, "val", regions, positions), "val", class_names, seed, max_patches_per_class, allow_missing=True)
    if val.empty:
        raise UserError(f"the validation subset of {prepared.name} has no {patch_size} px windows; use a smaller patch size or a larger dataset")

    test = _select(pixel_wise, "test", regions, positions)
    own_test = _select(own, "test", regions, positions)
    if test.empty:
        raise UserError(f"the test subset of {prepared.name} has no {patch_size} px pixel-wise windows; use a smaller patch size or a larger dataset")

    windows = ClassificationWindows(train=train, val=val, test=test, own_test=own_test, class_names=class_names)
    logger.info("windows: %s", ", ".join(f"{name} {count}" for name, count in windows.counts().items()))
    return windows
