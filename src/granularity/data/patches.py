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
    _write_integrals(union, integrals)
    return integrals


def _write_integrals(union: np.ndarray, integrals: np.ndarray) -> None:
    for class_index in range(union.shape[0]):
        # cv2.integral writes into the preallocated slice, which saves a copy per class.
        cv2.integral(union[class_index].view(np.uint8), sum=integrals[class_index], sdepth=cv2.CV_32S)


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
    granularity, so that several patch sizes share it; ``region_windows``
    shares them across granularities too.
    """
    stride = resolve_stride(patch_size, stride)
    union = _union(maps, granularity)
    height, width = union.shape[1:]
    if region_shape is not None and tuple(region_shape) != (height, width):
        raise ValueError(f"region shape {tuple(region_shape)} differs from the maps' shape {(height, width)}")
    if integrals is None:
        integrals = class_integrals(maps, granularity)
    return _label_grid(maps, integrals[None], _complete_boxes(maps, [granularity]), patch_size, stride)[0]


def region_windows(
    maps: GranularityMaps,
    patch_sizes: Iterable[int] = (32, 64, 128),
    granularities: Iterable[str] = GRANULARITIES,
    stride: int | None = None,
) -> dict[tuple[int, str], WindowLabels]:
    """Label the windows of one region for every patch size and granularity.

    The result equals ``window_labels`` for each pair. The integral images of
    every granularity are computed once, and each patch size is labelled for
    all granularities together, which saves most of the per-call work.
    """
    patch_sizes = list(patch_sizes)
    granularities = list(granularities)
    strides = [resolve_stride(patch_size, stride) for patch_size in patch_sizes]
    unions = [_union(maps, granularity) for granularity in granularities]
    if not unions or not patch_sizes:
        return {}

    num_classes, height, width = unions[0].shape
    integrals = np.empty((len(unions), num_classes, height + 1, width + 1), dtype=np.int32)
    for index, union in enumerate(unions):
        _write_integrals(union, integrals[index])

    boxes = _complete_boxes(maps, granularities)
    result = {}
    for patch_size, patch_stride in zip(patch_sizes, strides):
        labelled = _label_grid(maps, integrals, boxes, patch_size, patch_stride)
        result.update({(patch_size, granularity): windows for granularity, windows in zip(granularities, labelled)})
    return result


def _label_grid(
    maps: GranularityMaps, integrals: np.ndarray, boxes: np.ndarray, patch_size: int, stride: int
) -> list[WindowLabels]:
    """Label one patch size for G granularities.

    Args:
        maps: the region's maps, for the class severities.
        integrals: G x K x (H + 1) x (W + 1) integral images, see ``class_integrals``.
        boxes: G x N x 4 boxes from ``_complete_boxes``.
        patch_size, stride: the window grid.
    """
    count = integrals.shape[0]
    height, width = integrals.shape[2] - 1, integrals.shape[3] - 1
    xs = window_positions(width, patch_size, stride)
    ys = window_positions(height, patch_size, stride)
    empty = WindowLabels(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if xs.size == 0 or ys.size == 0:
        return [empty] * count

    keep = _complete_counts(boxes, patch_size, xs, ys) > 0
    if not keep.any():
        return [empty] * count
    if maps.class_severities is None:
        raise ValueError("the maps hold no class severities; rebuild them with derive_granularities")

    # Pixels of each class inside each window (G x K x ny x nx). Window (iy, ix)
    # spans integral rows ys[iy] .. ys[iy] + patch_size, so strided slices of
    # the integral images give all four corners without copying.
    last_y, last_x = int(ys[-1]), int(xs[-1])
    top, bottom = slice(0, last_y + 1, stride), slice(patch_size, last_y + patch_size + 1, stride)
    left, right = slice(0, last_x + 1, stride), slice(patch_size, last_x + patch_size + 1, stride)
    counts = integrals[:, :, bottom, right] - integrals[:, :, top, right]
    counts -= integrals[:, :, bottom, left]
    counts += integrals[:, :, top, left]
    covered = counts > 0

    # The label is the most severe class present: the first True along the
    # classes ordered from most to least severe.
    most_severe_first = severity_order(maps.class_severities)[::-1]
    by_severity = covered[:, most_severe_first]
    label = np.where(by_severity.any(axis=1), most_severe_first[by_severity.argmax(axis=1)], -1)

    # A complete shape covers its own window, so every kept window has a label.
    result = []
    for index in range(count):
        iy, ix = np.nonzero(keep[index])
        result.append(WindowLabels(x=xs[ix], y=ys[iy], label=label[index, iy, ix].astype(np.int64)))
    return result


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
    per_region = [
        region_windows(region_maps, patch_sizes, granularities, stride)
        for region_maps in tqdm(maps, desc="labelling windows", unit="region", disable=not progress)
    ]
    return windows_table(per_region, patch_sizes, granularities)


def windows_table(
    per_region: Sequence[dict[tuple[int, str], WindowLabels]], patch_sizes: Iterable[int], granularities: Iterable[str]
) -> dict[tuple[int, str], pd.DataFrame]:
    """Concatenate the ``region_windows`` results of many regions into one table per (patch size, granularity).

    Each table has the columns ``region`` (index into ``per_region``), ``x``,
    ``y``, ``size`` and ``label``, in region order.
    """
    tables = {}
    for patch_size in patch_sizes:
        for granularity in granularities:
            windows = [region[(patch_size, granularity)] for region in per_region]
            counts = [len(w.x) for w in windows]
            empty = np.zeros(0, dtype=np.int64)
            tables[(patch_size, granularity)] = pd.DataFrame(
                {
                    "region": np.repeat(np.arange(len(windows), dtype=np.int64), counts),
                    "x": np.concatenate([w.x for w in windows]) if windows else empty,
                    "y": np.concatenate([w.y for w in windows]) if windows else empty,
                    "size": np.full(sum(counts), patch_size, dtype=np.int64),
                    "label": np.concatenate([w.label for w in windows]) if windows else empty,
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


def _complete_boxes(maps: GranularityMaps, granularities: list[str]) -> np.ndarray:
    """Return G x N x 4 int64 shape boxes per granularity, with x0 = -1 for every shape that is not complete.

    A shape is left out of the window counts when the region edge clips it or
    it has no pixels. Every window starts at x >= 0, so a box starting at
    x0 = -1 never fits inside one.
    """
    boxes = np.stack([maps.shape_boxes[granularity] for granularity in granularities]).astype(np.int64)
    complete = np.stack([maps.complete(granularity) for granularity in granularities]) & (boxes[:, :, 2] >= boxes[:, :, 0])
    boxes[:, :, 0][~complete] = -1
    return boxes


def _complete_counts(boxes: np.ndarray, patch_size: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Return G x ny x nx: how many complete shapes lie wholly inside each window, per granularity.

    Containment splits into a column test and a row test per shape, so the
    count is the product of two shape-by-window matrices (exact in float32
    for fewer than 2**24 shapes).
    """
    in_columns = (xs <= boxes[:, :, 0:1]) & (xs + (patch_size - 1) >= boxes[:, :, 2:3])
    in_rows = (ys <= boxes[:, :, 1:2]) & (ys + (patch_size - 1) >= boxes[:, :, 3:4])
    return np.matmul(in_rows.transpose(0, 2, 1).astype(np.float32), in_columns.astype(np.float32))
