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
hundreds of nuclei. Contours are traced once per colour of a colouring in
which no two touching nuclei share a colour (on its crop for a nucleus of
several pieces), all ellipses of a region are rasterised together row by
row, and overlaps are resolved from the list of covered pixels.
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

# Seed of OpenCV's RNG before every ellipse fit; see _ellipse_from_points.
FIT_RNG_SEED = 0

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
        fit_kinds: N int8, how each ellipse was obtained, as an index into
            ``FIT_KINDS`` ("fit", "tiny", "degenerate"), aligned with
            ``nucleus_ids``.
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
    fit_kinds: np.ndarray | None = None

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
    cx, cy, axis_w, axis_h, angle, kind = _ellipse_from_points(points, x, y, w, h)
    return Ellipse(cx=cx, cy=cy, width=axis_w, height=axis_h, angle=angle), FIT_KINDS[kind]


# Origins of an ellipse, indexed by the codes in ``GranularityMaps.fit_kinds``: a fit, or the inscribed
# fallback for a contour of fewer than 5 points or a degenerate fit.
FIT_KINDS = ("fit", "tiny", "degenerate")
_FIT, _TINY, _DEGENERATE = 0, 1, 2


def _ellipse_from_points(points: np.ndarray, x: int, y: int, w: int, h: int) -> tuple[float, float, float, float, float, int]:
    """Fit an ellipse to contour points given relative to the box at (x, y) of w x h pixels.

    Returns (cx, cy, width, height, angle) in region coordinates and the
    index of the kind in ``FIT_KINDS``, with the same rules as ``fit_ellipse``.
    """
    if len(points) < MIN_CONTOUR_POINTS:
        return x + (w - 1) / 2.0, y + (h - 1) / 2.0, float(w - 1), float(h - 1), 0.0, _TINY

    # For nearly collinear points, cv2.fitEllipse (OpenCV 5.1) jitters them with
    # the thread's global RNG, so without a fixed seed such a nucleus gets a
    # different ellipse on every call. Seeding before each fit makes the
    # ellipse a function of the points alone, whatever ran before.
    cv2.setRNGSeed(FIT_RNG_SEED)
    (cx, cy), (axis_w, axis_h), angle = cv2.fitEllipse(points)
    longest_allowed = math.hypot(w, h) + AXIS_SLACK_PX
    # Every comparison with NaN is False, so a NaN axis or centre fails these tests too.
    if (
        MIN_AXIS_PX <= axis_w <= longest_allowed
        and MIN_AXIS_PX <= axis_h <= longest_allowed
        and abs(cx) < math.inf
        and abs(cy) < math.inf
    ):
        return cx + x, cy + y, axis_w, axis_h, angle, _FIT
    return x + (w - 1) / 2.0, y + (h - 1) / 2.0, float(w - 1), float(h - 1), 0.0, _DEGENERATE


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


def derive_granularities(
    region: Region,
    class_map: ClassMap,
    ellipses: np.ndarray | None = None,
    fit_kinds: np.ndarray | None = None,
    class_unions: bool = True,
) -> GranularityMaps:
    """Derive the ellipse and box annotations of a region and rasterise all three granularities.

    Overlaps are resolved per pixel. The nucleus whose own outline covers the
    pixel keeps it. Failing that, the more severe class wins (class-map
    severities), then the smaller nucleus by outline area, then the smaller
    id. The ``pw`` instance map equals ``region.instances``.

    Args:
        region: the region to convert.
        class_map: the class map whose severities resolve overlaps.
        ellipses, fit_kinds: the ``ellipses`` and ``fit_kinds`` of maps derived
            earlier from the same region. Given both, contours are neither
            traced nor fitted again, so a cache can store them in place of
            the maps.
        class_unions: False leaves ``class_union`` empty, which saves time and
            memory when no windows are labelled from these maps.

    Raises:
        DatasetError: the instance map is not 2-D, contains negative ids, or an
            id has no valid class in ``region.classes``.
        ValueError: ``ellipses`` or ``fit_kinds`` do not have one row per nucleus.
    """
    source = region.source or region.name
    shape = region.shape
    height, width = shape
    labels, label_ids = _compact_labels(region.instances, source)

    max_label = int(labels.max(initial=0))
    # Labels below 256 fit in uint8, for which OpenCV's table lookups are several times faster than numpy's.
    labels_u8 = labels.astype(np.uint8) if max_label < 256 else None
    traced = ellipses is None or fit_kinds is None
    if traced:
        present, box_rows, contours = _trace_outlines(labels, labels_u8)
    else:
        present, box_rows = _nucleus_boxes(labels)
    count = len(present)
    nucleus_ids = present if label_ids is None else label_ids[present]
    boxes = np.array(box_rows, dtype=np.int64).reshape(count, 4)
    flat_labels = labels.ravel()
    areas = np.bincount(flat_labels[flat_labels != 0], minlength=max_label + 1)[present].astype(np.int64)

    severities = np.asarray(class_map.severities, dtype=np.int64)
    num_classes = class_map.num_classes
    nucleus_classes = _nucleus_classes(region, nucleus_ids, num_classes, class_map.path, source)

    if traced:
        ellipses, kinds = _fit_ellipses(labels, present, box_rows, contours)
    else:
        ellipses = np.array(ellipses, dtype=np.float64)
        kinds = np.array(fit_kinds, dtype=np.int8)
        if ellipses.shape != (count, 5) or kinds.shape != (count,):
            raise ValueError(
                f"{source}: {len(ellipses)} ellipses and {len(kinds)} fit kinds given for {count} nuclei; "
                "pass the ellipses and fit_kinds of maps derived from this region"
            )

    el_index, el_pixels, covered, el_clipped = rasterise_ellipses(ellipses, shape)
    empty_fits = np.flatnonzero(covered == 0)
    if empty_fits.size:
        # A fit so thin that it covers no pixel centre counts as degenerate too.
        for n in empty_fits.tolist():
            x0, y0, x1, y1 = box_rows[n]
            ellipse = inscribed_ellipse(x0, y0, x1 - x0 + 1, y1 - y0 + 1)
            ellipses[n] = (ellipse.cx, ellipse.cy, ellipse.width, ellipse.height, ellipse.angle)
            kinds[n] = _DEGENERATE
        el_index, el_pixels, covered, el_clipped = rasterise_ellipses(ellipses, shape)

    tiny = int(np.count_nonzero(kinds == _TINY))
    degenerate = int(np.count_nonzero(kinds == _DEGENERATE))
    fallback_ids = nucleus_ids[kinds != _FIT].tolist()
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

    class_lookup = np.zeros(max(max_label + 1, 256), dtype=np.uint8)
    class_lookup[present] = nucleus_classes + 1
    pw_classes = _lookup(class_lookup, labels, labels_u8)

    instance_maps = {"pw": region.instances.astype(np.int32, copy=True)}
    for granularity, label_map in (("el", el_labels), ("bd", bd_labels)):
        instance_maps[granularity] = label_map if label_ids is None else label_ids[label_map]

    class_union = {}
    if class_unions:
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
        class_maps={"pw": pw_classes, "el": _lookup(class_lookup, el_labels), "bd": _lookup(class_lookup, bd_labels)},
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
        fit_kinds=kinds,
    )


def _lookup(table: np.ndarray, labels: np.ndarray, labels_u8: np.ndarray | None = None) -> np.ndarray:
    """Return ``table[labels]`` as uint8; ``table`` has at least 256 entries and ``labels_u8`` is ``labels`` as uint8 or None."""
    if labels_u8 is None and int(labels.max(initial=0)) < 256:
        labels_u8 = labels.astype(np.uint8)
    if labels_u8 is not None:
        return cv2.LUT(labels_u8, table[:256])
    return np.take(table, labels)


def _nucleus_boxes(labels: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Return the labels present, sorted, and the inclusive (x0, y0, x1, y1) box of each."""
    # find_objects returns each label's tight bounding box, the same upright
    # box as cv2.boundingRect of the nucleus's pixels.
    slices = ndimage.find_objects(labels)
    box_rows = [(cols.start, rows.start, cols.stop - 1, rows.stop - 1) for rows, cols in filter(None, slices)]
    present = np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int32)
    return present, box_rows


def _trace_outlines(
    labels: np.ndarray, labels_u8: np.ndarray | None
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[np.ndarray | None]]:
    """Trace the outer contour of every nucleus; return the labels present, their boxes and their contours.

    Tracing every nucleus on its own crop costs one ``cv2.findContours`` call
    per nucleus. Instead, nuclei get colours so that no two touching ones
    (8-connected) share a colour, and each colour is traced once over the
    whole region. The outer border of a piece depends only on the piece's
    own pixels, so it equals the contour traced on its crop, point for point,
    and its bounding rectangle is the piece's box.

    Returns:
        The sorted labels present, the inclusive (x0, y0, x1, y1) box of each
        and its outer contour in region coordinates. The contour is None for
        a nucleus of several pieces, because the order of its pieces may
        differ from the crop's, so it is traced on its crop.
    """
    max_label = int(labels.max(initial=0))
    colour_lookup = _touching_colours(labels)
    if labels_u8 is not None:
        table = np.full(256, 255, dtype=np.uint8)
        table[1 : max_label + 1] = colour_lookup[1:]
        colours = cv2.LUT(labels_u8, table)
    else:
        colours = colour_lookup[labels]

    pieces = [0] * (max_label + 1)
    contours: list[np.ndarray | None] = [None] * (max_label + 1)
    rects: list[tuple[int, int, int, int] | None] = [None] * (max_label + 1)
    for colour in range(int(colour_lookup.max(initial=0)) + 1):
        # RETR_CCOMP puts every piece's outer border at the top level (parent -1),
        # also a piece lying in a hole of another nucleus, which RETR_EXTERNAL drops.
        found, hierarchy = cv2.findContours((colours == colour).view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        if not found:
            continue
        for contour, parent in zip(found, hierarchy[0, :, 3].tolist()):
            if parent != -1:
                continue
            x, y = contour[0, 0].tolist()
            label = int(labels[y, x])
            left, top, w, h = cv2.boundingRect(contour)
            rect = (left, top, left + w - 1, top + h - 1)
            if pieces[label]:
                contours[label] = None
                old = rects[label]
                rect = (min(old[0], rect[0]), min(old[1], rect[1]), max(old[2], rect[2]), max(old[3], rect[3]))
            else:
                contours[label] = contour
            pieces[label] += 1
            rects[label] = rect

    present = [label for label in range(1, max_label + 1) if pieces[label]]
    return (
        np.array(present, dtype=np.int32),
        [rects[label] for label in present],
        [contours[label] for label in present],
    )


def _fit_ellipses(
    labels: np.ndarray, present: np.ndarray, box_rows: list[tuple[int, int, int, int]], contours: list[np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Fit the ellipse of every nucleus; return N x 5 (cx, cy, width, height, angle) and N int8 fit kinds.

    Each nucleus is fitted to its outer contour in the coordinates of its
    bounding-box crop, exactly as ``fit_ellipse`` does, so the results do not
    depend on where the contour was traced.
    """
    rows = []
    for label, (x0, y0, x1, y1), points in zip(present.tolist(), box_rows, contours):
        if points is None:
            crop = (labels[y0 : y1 + 1, x0 : x1 + 1] == label).view(np.uint8)
            found, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            points = found[0] if len(found) == 1 else np.concatenate(found)
        else:
            points -= np.array((x0, y0), dtype=points.dtype)
        rows.append(_ellipse_from_points(points, x0, y0, x1 - x0 + 1, y1 - y0 + 1))
    ellipses = np.array([row[:5] for row in rows], dtype=np.float64).reshape(len(rows), 5)
    kinds = np.array([row[5] for row in rows], dtype=np.int8)
    return ellipses, kinds


def _touching_colours(labels: np.ndarray) -> np.ndarray:
    """Return a colour per label (-1 for background) that no two 8-connected touching nuclei share.

    Colours are chosen greedily in label order, so a nucleus with d touching
    neighbours gets a colour of at most d.
    """
    max_label = int(labels.max(initial=0))
    width = labels.shape[1]
    flat = labels.ravel()
    foreground = flat != 0

    # Neighbours along the flat array: right, down, down-right and down-left.
    # Shifts by 1, W + 1 and W - 1 also pair the last pixel of a row with a
    # pixel of the next row, which only adds edges and so keeps every colour valid.
    keys = []
    for shift in (1, width, width + 1, width - 1):
        if shift <= 0 or shift >= flat.size:
            continue
        first, second = flat[:-shift], flat[shift:]
        index = np.flatnonzero((first != second) & foreground[:-shift] & foreground[shift:])
        a, b = first[index].astype(np.int64), second[index].astype(np.int64)
        keys.append(np.minimum(a, b) * (max_label + 1) + np.maximum(a, b))

    colour = np.zeros(max_label + 1, dtype=np.int32)
    colour[0] = -1
    edges = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    if edges.size == 0:
        return colour

    neighbours: dict[int, list[int]] = {}
    for low, high in zip((edges // (max_label + 1)).tolist(), (edges % (max_label + 1)).tolist()):
        neighbours.setdefault(low, []).append(high)
        neighbours.setdefault(high, []).append(low)
    chosen: dict[int, int] = {}
    for label in sorted(neighbours):
        taken = {chosen[n] for n in neighbours[label] if n in chosen}
        value = 0
        while value in taken:
            value += 1
        chosen[label] = value
    colour[list(chosen)] = list(chosen.values())
    return colour


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

    ``shape_index`` must be sorted and each shape's pixels in raster order,
    as ``rasterise_ellipses`` returns them, so every shape is one slice whose
    first and last pixels are its top and bottom rows. A shape without
    pixels gets (x, y, x - 1, y - 1) at its row of ``origins``.
    """
    extents = np.empty((count, 4), dtype=np.int64)
    extents[:, 0:2] = origins
    extents[:, 2:4] = origins - 1

    sizes = np.bincount(shape_index, minlength=count)
    filled = np.flatnonzero(sizes)
    if filled.size:
        first = (np.cumsum(sizes) - sizes)[filled]
        last = first + sizes[filled] - 1
        x = pixel_index % width
        extents[filled, 0] = np.minimum.reduceat(x, first)
        extents[filled, 2] = np.maximum.reduceat(x, first)
        extents[filled, 1] = pixel_index[first] // width
        extents[filled, 3] = pixel_index[last] // width
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

