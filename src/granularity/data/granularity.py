"""Granularity conversion: ellipse and bounding-box annotations derived from outlines.

Every nucleus gets three shapes: its outline as given (``pw``), the ellipse
that ``cv2.fitEllipse`` fits to its outer contour (``el``) and its upright
bounding box from ``cv2.boundingRect`` (``bd``). The shapes are rasterised back
into instance maps, so every pixel of every granularity still names one nucleus.

Conventions:

- Coordinates are pixel centres: pixel (x, y) is the point (x, y), and OpenCV
  contour points lie on the centres of the boundary pixels.
- A pixel belongs to an ellipse when its centre lies inside the ellipse whose
  semi-axes are widened by half a pixel. The fitted contour runs through the
  centres of the boundary pixels, so without the half pixel an ellipse would
  cut every boundary pixel in half. With it, the fallback ellipse inscribed in
  a box of w x h pixels has semi-axes w/2 and h/2 and never leaves the box.
- A nucleus made of several separate pieces is fitted to the points of all
  its external contours together, so its ellipse spans every piece.

No step builds a full-region mask per nucleus, because a region can hold
hundreds of nuclei. Contours are traced on the crop of each nucleus's box,
all ellipses of a region are rasterised together row by row, and overlaps
are resolved from the list of covered pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from granularity.data.class_map import ClassMap
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

GRANULARITIES = ("pw", "el", "bd")

# cv2.fitEllipse needs at least 5 points.
MIN_CONTOUR_POINTS = 5

# A fit to collinear points returns an axis of about 1e-3 px, not exactly zero,
# so any axis below this length counts as zero.
MIN_AXIS_PX = 0.1

# A fitted axis longer than the box diagonal plus this slack is a failed fit.
AXIS_SLACK_PX = 2.0

# Half a pixel added to both semi-axes when rasterising; see the module docstring.
RASTER_MARGIN_PX = 0.5

# Above this many ids per pixel the ids are relabelled to 1..N first, so that
# lookup tables indexed by id stay small.
_MAX_IDS_PER_PIXEL = 4


@dataclass
class GranularityMaps:
    """The annotations of one region at every granularity.

    Attributes:
        instance_maps: granularity -> H x W int32 instance map. Overlaps are
            resolved (own outline, then more severe class, then smaller
            nucleus) and shapes are clipped at the region edge, so every
            pixel still names one nucleus.
        class_maps: granularity -> H x W uint8 class mask, 0 background,
            class index + 1 per nucleus.
        class_union: granularity -> K x H x W bool, the union of the
            unresolved shapes of each class (for patch labels: a box hidden
            under another box still covers its pixels).
        nucleus_ids: N int32 nucleus ids, sorted.
        nucleus_classes: N int class indices, aligned with ``nucleus_ids``.
        shape_boxes: granularity -> N x 4 int32 (x0, y0, x1, y1), inclusive
            extent of each nucleus's clipped shape, aligned with
            ``nucleus_ids``.
        cut: N bool, True where a nucleus touches the region edge.
        ellipse_fallbacks: nuclei whose ellipse is the one inscribed in their box.
        fallback_ids: ids of those nuclei.
        clipped: granularity -> N bool, True where the region edge clipped the
            nucleus's shape at that granularity. An ellipse can reach past the
            edge although its nucleus does not touch it. Equal to ``cut`` for
            ``pw`` and ``bd``.
        class_severities: K severity ranks in class order (higher is more
            severe), copied from the class map for labelling patches.
        tiny_fallbacks: fallbacks because the contour had fewer than 5 points.
        degenerate_fallbacks: fallbacks because the fitted ellipse was
            degenerate (an axis NaN, zero or longer than the box diagonal
            plus 2 px).
        ellipses: N x 5 float64 (cx, cy, width, height, angle) of each
            nucleus's ellipse before rasterising, aligned with
            ``nucleus_ids``; see ``Ellipse`` for the convention.
    """

    instance_maps: dict[str, np.ndarray]
    class_maps: dict[str, np.ndarray]
    class_union: dict[str, np.ndarray]
    nucleus_ids: np.ndarray
    nucleus_classes: np.ndarray
    shape_boxes: dict[str, np.ndarray]
    cut: np.ndarray
    ellipse_fallbacks: int = 0
    fallback_ids: list[int] = field(default_factory=list)
    clipped: dict[str, np.ndarray] = field(default_factory=dict)
    class_severities: np.ndarray | None = None
    tiny_fallbacks: int = 0
    degenerate_fallbacks: int = 0
    ellipses: np.ndarray | None = None

    def complete(self, granularity: str) -> np.ndarray:
        """Return N bool: the nuclei whose shape at ``granularity`` is whole inside the region."""
        clipped = self.clipped.get(granularity, self.cut)
        return ~(self.cut | clipped)


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in OpenCV's RotatedRect form, in region pixel-centre coordinates.

    ``width`` and ``height`` are full axis lengths. ``angle`` is in degrees,
    measured from the x axis towards the y axis (clockwise on screen), and
    turns the ``width`` axis.
    """

    cx: float
    cy: float
    width: float
    height: float
    angle: float


def inscribed_ellipse(x: int, y: int, w: int, h: int) -> Ellipse:
    """Return the upright ellipse inscribed in the box of w x h pixels at (x, y).

    The axes are w - 1 and h - 1 in pixel-centre coordinates, so with the
    half-pixel raster margin the ellipse reaches the box's outer edges.
    """
    return Ellipse(cx=x + (w - 1) / 2.0, cy=y + (h - 1) / 2.0, width=float(w - 1), height=float(h - 1), angle=0.0)


def fit_ellipse(mask: np.ndarray, x: int, y: int) -> tuple[Ellipse, str]:
    """Fit an ellipse to the outer contour of one nucleus.

    Args:
        mask: uint8 crop of the nucleus's bounding box, non-zero on its pixels.
        x, y: position of the crop in the region.

    Returns:
        The ellipse in region coordinates and how it was obtained: ``"fit"``,
        ``"tiny"`` (fewer than 5 contour points) or ``"degenerate"`` (an axis
        NaN, zero or longer than the box diagonal plus 2 px). Both fallbacks
        return the ellipse inscribed in the bounding box.
    """
    h, w = mask.shape
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = contours[0] if len(contours) == 1 else np.concatenate(contours)
    if len(points) < MIN_CONTOUR_POINTS:
        return inscribed_ellipse(x, y, w, h), "tiny"

    (cx, cy), (axis_w, axis_h), angle = cv2.fitEllipse(points)
    longest_allowed = math.hypot(w, h) + AXIS_SLACK_PX
    axes_finite = math.isfinite(axis_w) and math.isfinite(axis_h) and math.isfinite(cx) and math.isfinite(cy)
    if not axes_finite or min(axis_w, axis_h) < MIN_AXIS_PX or max(axis_w, axis_h) > longest_allowed:
        return inscribed_ellipse(x, y, w, h), "degenerate"
    return Ellipse(cx=cx + x, cy=cy + y, width=axis_w, height=axis_h, angle=angle), "fit"


def _expand_runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (run index, value) for every integer of the runs starts[i] .. starts[i] + lengths[i] - 1."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    values = np.arange(int(lengths.sum()), dtype=np.int64) + (starts - first)[run]
    return run, values


def rasterise_ellipses(ellipses: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise many ellipses at once, clipped at the region edge.

    A pixel is covered when its centre lies inside the ellipse widened by
    ``RASTER_MARGIN_PX`` on both semi-axes. Each pixel row of an ellipse is
    one run between the two roots of the ellipse's quadratic in x, so the work
    is proportional to the covered pixels.

    Args:
        ellipses: N x 5 float array of (cx, cy, width, height, angle) rows,
            in the ``Ellipse`` convention.
        shape: (H, W) of the region.

    Returns:
        (shape_index, pixel_index, covered, clipped). The first two give, for
        every covered pixel inside the region, the row of its ellipse and its
        flat index ``y * W + x``. The last two give, per ellipse, the number
        of covered pixel centres before clipping and whether the region edge
        removed any of them.
    """
    height, width = shape
    count = len(ellipses)
    ellipses = np.asarray(ellipses, dtype=np.float64).reshape(count, 5)
    cx, cy = ellipses[:, 0], ellipses[:, 1]
    a = ellipses[:, 2] / 2.0 + RASTER_MARGIN_PX
    b = ellipses[:, 3] / 2.0 + RASTER_MARGIN_PX
    theta = np.radians(ellipses[:, 4])
    cos_t, sin_t = np.cos(theta), np.sin(theta)

    # The rows an ellipse can reach: its vertical half extent around cy.
    extent_y = np.sqrt((a * sin_t) ** 2 + (b * cos_t) ** 2)
    y0 = np.ceil(cy - extent_y).astype(np.int64)
    y1 = np.floor(cy + extent_y).astype(np.int64)
    row_shape, y = _expand_runs(y0, np.maximum(y1 - y0 + 1, 0))

    # Inside test u^2 + v^2 <= 1 with u = (dx c + dy s) / a and v = (dy c - dx s) / b,
    # written as qa dx^2 + qb dx + qc <= 0 for the fixed dy of each row.
    inv_a2, inv_b2 = 1.0 / (a * a), 1.0 / (b * b)
    qa = (cos_t**2 * inv_a2 + sin_t**2 * inv_b2)[row_shape]
    dy = y - cy[row_shape]
    qb = 2.0 * dy * (cos_t * sin_t * (inv_a2 - inv_b2))[row_shape]
    qc = dy * dy * (sin_t**2 * inv_a2 + cos_t**2 * inv_b2)[row_shape] - 1.0
    discriminant = qb * qb - 4.0 * qa * qc
    root = np.sqrt(np.maximum(discriminant, 0.0))
    row_cx = cx[row_shape]
    x_start = np.ceil(row_cx + (-qb - root) / (2.0 * qa)).astype(np.int64)
    x_stop = np.floor(row_cx + (-qb + root) / (2.0 * qa)).astype(np.int64) + 1
    x_stop = np.where(discriminant < 0.0, x_start, np.maximum(x_stop, x_start))
    covered = np.bincount(row_shape, weights=x_stop - x_start, minlength=count).astype(np.int64)

    # Clip every run at the region edge and note which ellipses lost pixels.
    clip_start = np.clip(x_start, 0, width)
    clip_stop = np.clip(x_stop, 0, width)
    row_inside = (y >= 0) & (y < height)
    clip_stop = np.where(row_inside, np.maximum(clip_stop, clip_start), clip_start)
    kept_lengths = clip_stop - clip_start
    lost = (x_stop - x_start) - kept_lengths
    clipped = np.bincount(row_shape, weights=lost, minlength=count) > 0

    run, x = _expand_runs(clip_start, kept_lengths)
    return row_shape[run], y[run] * width + x, covered, clipped


def ellipse_mask(ellipse: Ellipse, shape: tuple[int, int]) -> np.ndarray:
    """Return the H x W bool mask of one ellipse, rasterised as in ``rasterise_ellipses``."""
    row = np.array([[ellipse.cx, ellipse.cy, ellipse.width, ellipse.height, ellipse.angle]])
    _, pixels, _, _ = rasterise_ellipses(row, shape)
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    mask[pixels] = True
    return mask.reshape(shape)


def _compact_labels(instances: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Return a label image with small ids, and the original id of each label (None when unchanged)."""
    if instances.ndim != 2:
        raise DatasetError(f"{source}: instance map has shape {instances.shape}; expected H x W")
    if instances.size and int(instances.min()) < 0:
        raise DatasetError(f"{source}: instance map contains negative id {int(instances.min())}; use 0 for background and positive nucleus ids")
    labels = instances.astype(np.int32, copy=False)
    max_id = int(labels.max(initial=0))
    if max_id <= _MAX_IDS_PER_PIXEL * labels.size:
        return labels, None

    ids = np.unique(labels)
    ids = ids[ids != 0]
    compact = np.zeros(labels.shape, dtype=np.int32)
    foreground = labels != 0
    compact[foreground] = np.searchsorted(ids, labels[foreground]) + 1
    return compact, np.concatenate([[0], ids]).astype(np.int32)


def severity_order(severities: np.ndarray) -> np.ndarray:
    """Return the class indices from least to most severe.

    Among classes of equal severity, the one listed first in the class map
    counts as more severe, so the order is total and labels are reproducible.
    """
    severities = np.asarray(severities)
    indices = np.arange(len(severities))
    return np.lexsort((-indices, severities))


def _resolve_overlaps(shape_index, pixel_index, labels_flat, shape_labels, rank) -> np.ndarray:
    """Return the flat label map where every covered pixel goes to one shape.

    The shape whose own outline covers the pixel wins; otherwise the shape
    with the highest ``rank`` (severity, then smaller area, then smaller id).
    """
    count = len(shape_labels)
    own = labels_flat[pixel_index] == shape_labels[shape_index]
    key = (rank[shape_index] + count * own).astype(np.int32)
    best = np.full(labels_flat.size, -1, dtype=np.int32)
    np.maximum.at(best, pixel_index, key)

    # Keys count..2*count-1 are the own-outline versions of ranks 0..count-1.
    label_by_rank = np.empty(count, dtype=labels_flat.dtype)
    label_by_rank[rank] = shape_labels
    label_by_key = np.concatenate([label_by_rank, label_by_rank])
    painted = np.zeros(labels_flat.size, dtype=labels_flat.dtype)
    painted[pixel_index] = label_by_key[best[pixel_index]]
    return painted


def _paint_boxes(labels, boxes, present, paint_order) -> np.ndarray:
    """Return the resolved box label map: painter's order, then every outline pixel keeps its nucleus."""
    painted = np.zeros_like(labels)
    for n in paint_order.tolist():
        x0, y0, x1, y1 = boxes[n]
        painted[y0 : y1 + 1, x0 : x1 + 1] = present[n]

    # A box always covers its own outline, so the own-outline rule keeps every outline pixel.
    np.copyto(painted, labels, where=labels != 0)
    return painted


def derive_granularities(region: Region, class_map: ClassMap) -> GranularityMaps:
    """Derive the ellipse and box annotations of a region and rasterise all three granularities.

    Overlaps are resolved per pixel. The nucleus whose own outline covers the
    pixel keeps it. Failing that, the more severe class wins (class-map
    severities), then the smaller nucleus by outline area, then the smaller
    id. The ``pw`` instance map equals ``region.instances``.

    Raises:
        DatasetError: the instance map is not 2-D, holds negative ids, or an
            id has no valid class in ``region.classes``.
    """
    source = region.source or region.name
    shape = region.shape
    height, width = shape
    labels, label_ids = _compact_labels(region.instances, source)

    # find_objects returns each label's tight bounding box, the same upright
    # box as cv2.boundingRect of the nucleus's pixels.
    slices = ndimage.find_objects(labels)
    present = np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int32)
    count = len(present)
    nucleus_ids = present if label_ids is None else label_ids[present]

    severities = np.asarray(class_map.severities, dtype=np.int64)
    num_classes = class_map.num_classes
    nucleus_classes = _nucleus_classes(region, nucleus_ids, num_classes, class_map.path, source)

    # Per nucleus, on its bounding-box crop: box, outline area and fitted ellipse.
    box_rows, area_list, ellipse_rows, fit_kinds = [], [], [], []
    for label in present.tolist():
        rows, cols = slices[label - 1]
        box_rows.append((cols.start, rows.start, cols.stop - 1, rows.stop - 1))
        crop = (labels[rows, cols] == label).view(np.uint8)
        area_list.append(cv2.countNonZero(crop))
        ellipse, kind = fit_ellipse(crop, cols.start, rows.start)
        ellipse_rows.append((ellipse.cx, ellipse.cy, ellipse.width, ellipse.height, ellipse.angle))
        fit_kinds.append(kind)
    boxes = np.array(box_rows, dtype=np.int64).reshape(count, 4)
    areas = np.array(area_list, dtype=np.int64)
    ellipses = np.array(ellipse_rows, dtype=np.float64).reshape(count, 5)

    el_index, el_pixels, covered, el_clipped = rasterise_ellipses(ellipses, shape)
    empty_fits = np.flatnonzero(covered == 0)
    if empty_fits.size:
        # A fit so thin that it covers no pixel centre counts as degenerate too.
        for n in empty_fits.tolist():
            x0, y0, x1, y1 = boxes[n].tolist()
            ellipse = inscribed_ellipse(x0, y0, x1 - x0 + 1, y1 - y0 + 1)
            ellipses[n] = (ellipse.cx, ellipse.cy, ellipse.width, ellipse.height, ellipse.angle)
            fit_kinds[n] = "degenerate"
        el_index, el_pixels, covered, el_clipped = rasterise_ellipses(ellipses, shape)

    tiny = fit_kinds.count("tiny")
    degenerate = fit_kinds.count("degenerate")
    fallback_ids = [int(nucleus_ids[n]) for n in range(count) if fit_kinds[n] != "fit"]
    if fallback_ids:
        logger.debug(
            "region %s: %d nuclei, %d ellipse fallbacks (%d with fewer than %d contour points, %d degenerate fits)",
            region.name, count, len(fallback_ids), tiny, MIN_CONTOUR_POINTS, degenerate,
        )

    # rank: 0 for the nucleus painted first, count - 1 for the one that wins
    # every overlap (most severe, then smallest area, then smallest id).
    paint_order = np.lexsort((-nucleus_ids.astype(np.int64), -areas, severities[nucleus_classes]))
    rank = np.empty(count, dtype=np.int64)
    rank[paint_order] = np.arange(count)

    el_labels = _resolve_overlaps(el_index, el_pixels, labels.ravel(), present, rank).reshape(shape)
    bd_labels = _paint_boxes(labels, boxes, present, paint_order)

    class_lookup = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.uint8)
    class_lookup[present] = nucleus_classes + 1
    pw_classes = class_lookup[labels]

    instance_maps = {"pw": region.instances.astype(np.int32, copy=True)}
    for granularity, label_map in (("el", el_labels), ("bd", bd_labels)):
        instance_maps[granularity] = label_map if label_ids is None else label_ids[label_map]

    class_union = {
        "pw": _pixel_union(pw_classes, num_classes),
        "el": _ellipse_union(el_index, el_pixels, nucleus_classes, num_classes, shape),
        "bd": _box_union(boxes, nucleus_classes, num_classes, shape),
    }

    boxes = boxes.astype(np.int32)
    cut = (boxes[:, 0] == 0) | (boxes[:, 1] == 0) | (boxes[:, 2] == width - 1) | (boxes[:, 3] == height - 1)
    el_boxes = _shape_extents(el_index, el_pixels, count, width, boxes[:, 0:2].astype(np.int64))

    return GranularityMaps(
        instance_maps=instance_maps,
        class_maps={"pw": pw_classes, "el": class_lookup[el_labels], "bd": class_lookup[bd_labels]},
        class_union=class_union,
        nucleus_ids=nucleus_ids.astype(np.int32),
        nucleus_classes=nucleus_classes,
        shape_boxes={"pw": boxes, "el": el_boxes, "bd": boxes.copy()},
        cut=cut,
        ellipse_fallbacks=len(fallback_ids),
        fallback_ids=fallback_ids,
        clipped={"pw": cut.copy(), "el": el_clipped, "bd": cut.copy()},
        class_severities=severities.copy(),
        tiny_fallbacks=tiny,
        degenerate_fallbacks=degenerate,
        ellipses=ellipses,
    )


def _pixel_union(class_mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Return K x H x W bool from a class mask (class index + 1 per pixel)."""
    union = np.empty((num_classes,) + class_mask.shape, dtype=bool)
    for class_index in range(num_classes):
        np.equal(class_mask, class_index + 1, out=union[class_index])
    return union


def _ellipse_union(shape_index, pixel_index, shape_classes, num_classes, shape) -> np.ndarray:
    """Return K x H x W bool: the union of the unresolved ellipses of each class."""
    pixels = shape[0] * shape[1]
    union = np.zeros(num_classes * pixels, dtype=bool)
    union[shape_classes[shape_index] * pixels + pixel_index] = True
    return union.reshape((num_classes,) + tuple(shape))


def _box_union(boxes, shape_classes, num_classes, shape) -> np.ndarray:
    """Return K x H x W bool: the union of the boxes of each class."""
    union = np.zeros((num_classes,) + tuple(shape), dtype=bool)
    for (x0, y0, x1, y1), class_index in zip(boxes.tolist(), shape_classes.tolist()):
        union[class_index, y0 : y1 + 1, x0 : x1 + 1] = True
    return union


def _shape_extents(shape_index, pixel_index, count, width, origins) -> np.ndarray:
    """Return N x 4 inclusive (x0, y0, x1, y1) of each shape's pixels.

    A shape without pixels gets (x, y, x - 1, y - 1) at its row of ``origins``.
    """
    x = pixel_index % width
    y = pixel_index // width
    extents = np.empty((count, 4), dtype=np.int64)
    extents[:, 0:2] = np.iinfo(np.int64).max
    extents[:, 2:4] = -1
    np.minimum.at(extents[:, 0], shape_index, x)
    np.minimum.at(extents[:, 1], shape_index, y)
    np.maximum.at(extents[:, 2], shape_index, x)
    np.maximum.at(extents[:, 3], shape_index, y)

    empty = extents[:, 2] < 0
    extents[empty, 0:2] = origins[empty]
    extents[empty, 2:4] = origins[empty] - 1
    return extents.astype(np.int32)


def _nucleus_classes(region: Region, nucleus_ids: np.ndarray, num_classes: int, class_map_path: str, source: str) -> np.ndarray:
    """Return the class index of each nucleus, checked against the class map."""
    classes = np.empty(len(nucleus_ids), dtype=np.int64)
    for n, nucleus_id in enumerate(nucleus_ids.tolist()):
        class_index = region.classes.get(nucleus_id)
        if class_index is None:
            raise DatasetError(f"{source}: nucleus id {nucleus_id} has no class; give every id in the instance map a class")
        if not 0 <= class_index < num_classes:
            raise DatasetError(
                f"{source}: nucleus id {nucleus_id} has class index {class_index}, but class map {class_map_path} has {num_classes} classes"
            )
        classes[n] = class_index
    return classes

