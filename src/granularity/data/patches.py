"""Sliding windows over a region, labelled by the most severe annotation they touch.

A window of ``patch_size`` pixels moves over the region on a grid from (0, 0)
with step ``stride``, and only windows wholly inside the region exist. Its
label is the most severe class among the annotations of the studied
granularity that cover at least one of its pixels, whole or cut. So a box
reaching into a window puts its class into the label even where its nucleus
does not. A window is kept only when at least one annotation at that
granularity lies completely inside it. A nucleus cut by the region edge, or
an ellipse clipped by it, never counts as complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from granularity.data.granularity import GRANULARITIES, GranularityMaps, severity_order
from granularity.errors import ConfigError

logger = logging.getLogger(__name__)

WINDOW_COLUMNS = ["x", "y", "size", "label"]


@dataclass(frozen=True)
class WindowLabels:
    """The kept windows of one region: top-left corners and class indices, aligned."""

    x: np.ndarray
    y: np.ndarray
    label: np.ndarray


def resolve_stride(patch_size: int, stride: int | None) -> int:
    """Return the stride to use, half the window by default, after checking both values."""
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ConfigError(f"patch size {patch_size!r} is invalid; use a positive number of pixels such as 32, 64 or 128")
    if stride is None:
        return max(1, int(patch_size) // 2)
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ConfigError(f"stride {stride!r} is invalid; use a positive number of pixels or leave it unset for half the patch size")
    return int(stride)


def window_positions(length: int, patch_size: int, stride: int) -> np.ndarray:
    """Return the start of every window wholly inside ``length`` pixels: 0, stride, 2 * stride, ..."""
    return np.arange(0, length - patch_size + 1, stride, dtype=np.int64)


def class_integrals(maps: GranularityMaps, granularity: str) -> np.ndarray:
    """Return K x (H + 1) x (W + 1) int32 integral images of the per-class shape unions.

    ``integral[c, y, x]`` counts the pixels of class ``c`` in rows < y and
    columns < x. Compute it once per region and granularity and pass it to
    ``window_labels`` for every patch size.
    """
    union = _union(maps, granularity)
    classes, height, width = union.shape
    integrals = np.empty((classes, height + 1, width + 1), dtype=np.int32)
    for class_index in range(classes):
        # cv2.integral writes into the preallocated slice, which saves a copy per class.
        cv2.integral(union[class_index].view(np.uint8), sum=integrals[class_index], sdepth=cv2.CV_32S)
    return integrals


def window_labels(
    maps: GranularityMaps,
    granularity: str,
    patch_size: int,
    stride: int | None = None,
    region_shape: tuple[int, int] | None = None,
    integrals: np.ndarray | None = None,
) -> WindowLabels:
    """Label the windows of one region and return the kept ones as arrays.

    This is the fast form of ``label_windows``, without building a DataFrame.
    ``region_shape``, when given, must equal the maps' shape. ``integrals``
    may hold the result of ``class_integrals`` for this region and
    granularity, so that several patch sizes share it.
    """
    stride = resolve_stride(patch_size, stride)
    union = _union(maps, granularity)
    height, width = union.shape[1:]
    if region_shape is not None and tuple(region_shape) != (height, width):
        raise ValueError(f"region shape {tuple(region_shape)} differs from the maps' shape {(height, width)}")
    xs = window_positions(width, patch_size, stride)
    ys = window_positions(height, patch_size, stride)
    empty = np.zeros(0, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return WindowLabels(empty, empty, empty)

    keep = _complete_counts(maps, granularity, patch_size, stride, len(xs), len(ys)) > 0
    if not keep.any():
        return WindowLabels(empty, empty, empty)

    # Pixels of each class inside each window, from the integral images (K x ny x nx).
    if integrals is None:
        integrals = class_integrals(maps, granularity)
    row0, col0 = ys[:, None], xs[None, :]
    row1, col1 = row0 + patch_size, col0 + patch_size
    covered = (
        integrals[:, row1, col1] - integrals[:, row0, col1] - integrals[:, row1, col0] + integrals[:, row0, col0]
    ) > 0

    # Walk the classes from least to most severe, so the most severe present one is written last.
    if maps.class_severities is None:
        raise ValueError("the maps hold no class severities; rebuild them with derive_granularities")
    label = np.full(keep.shape, -1, dtype=np.int64)
    for class_index in severity_order(maps.class_severities).tolist():
        label[covered[class_index]] = class_index

    # A complete shape covers its own window, so every kept window has a label.
    iy, ix = np.nonzero(keep)
    return WindowLabels(x=xs[ix], y=ys[iy], label=label[iy, ix])


def label_windows(
    maps: GranularityMaps,
    granularity: str,
    patch_size: int,
    stride: int | None = None,
    region_shape: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Return the kept windows of one region as a table with columns x, y, size and label (class index).

    Rows run over the window grid row by row, top to bottom and left to right.
    """
    windows = window_labels(maps, granularity, patch_size, stride, region_shape)
    return pd.DataFrame(
        {
            "x": windows.x,
            "y": windows.y,
            "size": np.full(len(windows.x), patch_size, dtype=np.int64),
            "label": windows.label,
        },
        columns=WINDOW_COLUMNS,
    )


def label_all_windows(
    maps: Sequence[GranularityMaps],
    patch_sizes: Iterable[int] = (32, 64, 128),
    granularities: Iterable[str] = GRANULARITIES,
    stride: int | None = None,
    progress: bool = False,
) -> dict[tuple[int, str], pd.DataFrame]:
    """Label the windows of many regions for every patch size and granularity.

    Returns:
        (patch_size, granularity) -> table of every kept window with columns
        ``region`` (index into ``maps``), ``x``, ``y``, ``size`` and ``label``.
        ``stride`` applies to every patch size; None means half of each.
    """
    patch_sizes = list(patch_sizes)
    granularities = list(granularities)
    for patch_size in patch_sizes:
        resolve_stride(patch_size, stride)
    parts: dict[tuple[int, str], list[tuple[int, WindowLabels]]] = {(s, g): [] for s in patch_sizes for g in granularities}

    for region_index, region_maps in enumerate(tqdm(maps, desc="labelling windows", unit="region", disable=not progress)):
        for granularity in granularities:
            integrals = class_integrals(region_maps, granularity)
            for patch_size in patch_sizes:
                windows = window_labels(region_maps, granularity, patch_size, stride, integrals=integrals)
                parts[(patch_size, granularity)].append((region_index, windows))

    tables = {}
    for (patch_size, granularity), windows in parts.items():
        counts = [len(w.x) for _, w in windows]
        tables[(patch_size, granularity)] = pd.DataFrame(
            {
                "region": np.repeat(np.array([r for r, _ in windows], dtype=np.int64), counts),
                "x": np.concatenate([w.x for _, w in windows]) if windows else np.zeros(0, dtype=np.int64),
                "y": np.concatenate([w.y for _, w in windows]) if windows else np.zeros(0, dtype=np.int64),
                "size": np.full(sum(counts), patch_size, dtype=np.int64),
                "label": np.concatenate([w.label for _, w in windows]) if windows else np.zeros(0, dtype=np.int64),
            }
        )
        logger.debug("patch size %d, granularity %s: %d windows kept", patch_size, granularity, sum(counts))
    return tables


def extract_patch(image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """Return the size x size window of ``image`` at top-left (x, y), as a view.

    Raises:
        ValueError: the window does not lie wholly inside the image.
    """
    height, width = image.shape[:2]
    if size < 1 or x < 0 or y < 0 or x + size > width or y + size > height:
        raise ValueError(f"window x={x}, y={y}, size={size} does not fit inside an image of {width} x {height} pixels")
    return image[y : y + size, x : x + size]


def _union(maps: GranularityMaps, granularity: str) -> np.ndarray:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
    if granularity not in maps.class_union:
        # Caches may drop the unions to save space, and only derive_granularities rebuilds them.
        raise ValueError(f"the maps hold no class union for granularity {granularity!r}; rebuild them with derive_granularities")
    return maps.class_union[granularity]


def _complete_counts(maps: GranularityMaps, granularity: str, patch_size: int, stride: int, nx: int, ny: int) -> np.ndarray:
    """Return ny x nx: how many complete shapes lie wholly inside each window.

    Containment splits into a column test and a row test per shape, so the
    count is the product of two shape-by-window matrices (exact in float32
    for fewer than 2**24 shapes).
    """
    boxes = maps.shape_boxes[granularity].astype(np.int64)
    complete = maps.complete(granularity) & (boxes[:, 2] >= boxes[:, 0])
    boxes = boxes[complete]

    starts_x = np.arange(nx, dtype=np.int64) * stride
    starts_y = np.arange(ny, dtype=np.int64) * stride
    in_columns = (starts_x[None, :] <= boxes[:, 0:1]) & (starts_x[None, :] + patch_size - 1 >= boxes[:, 2:3])
    in_rows = (starts_y[None, :] <= boxes[:, 1:2]) & (starts_y[None, :] + patch_size - 1 >= boxes[:, 3:4])
    return in_rows.T.astype(np.float32) @ in_columns.astype(np.float32)
