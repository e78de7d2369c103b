"""Granularity conversion checked against independent per-pixel computations."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from granularity.data.class_map import ClassMap
from granularity.data.granularity import GRANULARITIES, derive_granularities
from granularity.data.region import Region
from granularity.errors import DatasetError

CONSEP_CLASS_MAP = Path(__file__).resolve().parents[1] / "mlproject" / "class_maps" / "consep.yaml"

# Severity order low < mid < high, deliberately not the class order.
CLASS_MAP = ClassMap.from_dict(
    {
        "name": "test",
        "classes": [
            {"name": "mid", "severity": 1},
            {"name": "low", "severity": 0},
            {"name": "high", "severity": 2},
        ],
    }
)
MID, LOW, HIGH = 0, 1, 2


def make_region(instances: np.ndarray, classes: dict[int, int]) -> Region:
    instances = np.asarray(instances, dtype=np.int32)
    image = np.zeros(instances.shape + (3,), dtype=np.uint8)
    return Region(name="synthetic", group="g", image=image, instances=instances, classes=classes, source="synthetic")


def random_instances(seed: int, size: int = 64, count: int = 14) -> tuple[np.ndarray, dict[int, int]]:
    """Draw overlapping rotated ellipses with scattered ids, later ones covering earlier ones."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((size, size), dtype=np.int32)
    ids = rng.choice(np.arange(1, 5000), size=count, replace=False)
    for nucleus_id in ids:
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(1, 9)), int(rng.integers(1, 6)))
        cv2.ellipse(instances, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(nucleus_id), -1)
    present = np.unique(instances)
    classes = {int(i): int(rng.integers(0, 3)) for i in present if i != 0}
    return instances, classes


def reference_ellipse(instances: np.ndarray, nucleus_id: int) -> np.ndarray:
    """Rasterise one nucleus's ellipse on the full image with per-pixel arithmetic."""
    mask = (instances == nucleus_id).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate(contours)
    fallback = (x0 + (w - 1) / 2, y0 + (h - 1) / 2, w - 1, h - 1, 0.0)
    if len(points) < 5:
        cx, cy, width, height, angle = fallback
    else:
        (cx, cy), (width, height), angle = cv2.fitEllipse(points)
        if not (np.isfinite([cx, cy, width, height]).all() and min(width, height) >= 0.1 and max(width, height) <= np.hypot(w, h) + 2):
            cx, cy, width, height, angle = fallback
    yy, xx = np.mgrid[0 : instances.shape[0], 0 : instances.shape[1]]
    theta = np.radians(angle)
    u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / (width / 2 + 0.5)
    v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / (height / 2 + 0.5)
    return u**2 + v**2 <= 1.0


def inscribed_reference(mask: np.ndarray) -> np.ndarray:
    """Return the pixels whose centres lie in the ellipse inscribed in the outer edges of the mask's box."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    half_w, half_h = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    return ((xx - (x0 + x1) / 2) / half_w) ** 2 + ((yy - (y0 + y1) / 2) / half_h) ** 2 <= 1


def reference_resolve(shapes: dict[int, np.ndarray], instances: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    """Resolve overlaps pixel by pixel: own outline, then severity, then smaller area, then smaller id."""
    severity = {i: CLASS_MAP.severities[c] for i, c in classes.items()}
    area = {i: int((instances == i).sum()) for i in shapes}
    resolved = np.zeros_like(instances)
    for y in range(instances.shape[0]):
        for x in range(instances.shape[1]):
            candidates = [i for i, shape in shapes.items() if shape[y, x]]
            if not candidates:
                continue
            owner = instances[y, x]
            if owner in candidates:
                resolved[y, x] = owner
            else:
                resolved[y, x] = max(candidates, key=lambda i: (severity[i], -area[i], -i))
    return resolved


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_matches_pixel_extent(seed):
    instances, classes = random_instances(seed)
    maps = derive_granularities(make_region(instances, classes), CLASS_MAP)

    for n, nucleus_id in enumerate(maps.nucleus_ids):
        ys, xs = np.nonzero(instances == nucleus_id)
        expected = [xs.min(), ys.min(), xs.max(), ys.max()]
        assert maps.shape_boxes["bd"][n].tolist() == expected
        x, y, w, h = cv2.boundingRect((instances == nucleus_id).astype(np.uint8))
        assert expected == [x, y, x + w - 1, y + h - 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bd_covers_every_outline_pixel(seed):
    instances, classes = random_instances(seed)
    maps = derive_granularities(make_region(instances, classes), CLASS_MAP)

    foreground = instances != 0
    assert (maps.instance_maps["bd"][foreground] == instances[foreground]).all()
    assert (maps.class_maps["bd"][foreground] != 0).all()


def test_pw_equals_input_with_scattered_ids():
    instances, classes = random_instances(3)
    maps = derive_granularities(make_region(instances, classes), CLASS_MAP)

    assert maps.instance_maps["pw"].dtype == np.int32
    assert np.array_equal(maps.instance_maps["pw"], instances)
    assert maps.nucleus_ids.tolist() == sorted(int(i) for i in np.unique(instances) if i != 0)
    expected_classes = np.zeros_like(instances, dtype=np.uint8)
    for nucleus_id, class_index in classes.items():
        expected_classes[instances == nucleus_id] = class_index + 1
    assert np.array_equal(maps.class_maps["pw"], expected_classes)


def test_huge_ids_are_kept():
    instances = np.zeros((12, 12), dtype=np.int64)
    instances[2:5, 2:6] = 2**31 - 1
    instances[7:10, 6:10] = 1_000_000_007
    classes = {2**31 - 1: HIGH, 1_000_000_007: LOW}
    maps = derive_granularities(make_region(instances, classes), CLASS_MAP)

    assert maps.nucleus_ids.tolist() == [1_000_000_007, 2**31 - 1]
    for granularity in GRANULARITIES:
        assert set(np.unique(maps.instance_maps[granularity]).tolist()) == {0, 1_000_000_007, 2**31 - 1}
    assert np.array_equal(maps.instance_maps["pw"], instances)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_resolved_maps_match_brute_force(seed):
    instances, classes = random_instances(seed, size=40, count=10)
    maps = derive_granularities(make_region(instances, classes), CLASS_MAP)
    ids = [int(i) for i in maps.nucleus_ids]

    boxes = {}
    for nucleus_id in ids:
        ys, xs = np.nonzero(instances == nucleus_id)
        box = np.zeros(instances.shape, dtype=bool)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        boxes[nucleus_id] = box
    ellipses = {nucleus_id: reference_ellipse(instances, nucleus_id) for nucleus_id in ids}

    assert np.array_equal(maps.instance_maps["bd"], reference_resolve(boxes, instances, classes))
    assert np.array_equal(maps.instance_maps["el"], reference_resolve(ellipses, instances, classes))
    for class_index in range(3):
        members = [i for i in ids if classes[i] == class_index]
        expected_box_union = np.any([boxes[i] for i in members], axis=0) if members else np.zeros(instances.shape, bool)
        expected_ellipse_union = np.any([ellipses[i] for i in members], axis=0) if members else np.zeros(instances.shape, bool)
        assert np.array_equal(maps.class_union["bd"][class_index], expected_box_union)
        assert np.array_equal(maps.class_union["el"][class_index], expected_ellipse_union)


def test_fitted_ellipse_extent_matches_reference():
    instances = np.zeros((40, 40), dtype=np.int32)
    cv2.ellipse(instances, (20, 18), (9, 4), 35.0, 0, 360, 5, -1)
    maps = derive_granularities(make_region(instances, {5: MID}), CLASS_MAP)
    expected = reference_ellipse(instances, 5)

    assert maps.ellipse_fallbacks == 0
    assert np.array_equal(maps.instance_maps["el"] == 5, expected)
    ys, xs = np.nonzero(expected)
    assert maps.shape_boxes["el"][0].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    # A fitted ellipse overlaps its nucleus closely.
    overlap = np.logical_and(expected, instances == 5).sum() / np.logical_or(expected, instances == 5).sum()
    assert overlap > 0.85


@pytest.mark.parametrize(
    "pixels",
    [
        [(5, 5)],
        [(5, 5), (6, 5)],
        [(5, 5), (6, 5), (5, 6)],
        [(5, 5), (6, 5), (5, 6), (6, 6)],
    ],
)
def test_tiny_nucleus_gets_inscribed_ellipse(pixels):
    instances = np.zeros((12, 12), dtype=np.int32)
    for x, y in pixels:
        instances[y, x] = 9
    maps = derive_granularities(make_region(instances, {9: LOW}), CLASS_MAP)

    assert maps.ellipse_fallbacks == 1
    assert maps.tiny_fallbacks == 1
    assert maps.fallback_ids == [9]
    assert np.array_equal(maps.instance_maps["el"] == 9, inscribed_reference(instances == 9))


@pytest.mark.parametrize(
    "line",
    [
        [(x, 6) for x in range(2, 11)],
        [(6, y) for y in range(2, 11)],
        [(x, x) for x in range(2, 11)],
    ],
)
def test_straight_line_nucleus_is_degenerate(line):
    instances = np.zeros((13, 13), dtype=np.int32)
    for x, y in line:
        instances[y, x] = 4
    maps = derive_granularities(make_region(instances, {4: MID}), CLASS_MAP)

    assert maps.ellipse_fallbacks == 1
    assert maps.degenerate_fallbacks == 1
    expected = inscribed_reference(instances == 4)
    assert np.array_equal(maps.instance_maps["el"] == 4, expected)
    ys, xs = np.nonzero(expected)
    assert maps.shape_boxes["el"][0].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_fallbacks_logged_once_per_region(caplog):
    instances = np.zeros((12, 12), dtype=np.int32)
    instances[2, 2] = 1
    instances[8, 8] = 2
    with caplog.at_level(logging.DEBUG, logger="granularity.data.granularity"):
        maps = derive_granularities(make_region(instances, {1: LOW, 2: LOW}), CLASS_MAP)

    assert maps.ellipse_fallbacks == 2
    records = [r for r in caplog.records if "fallback" in r.getMessage()]
    assert len(records) == 1
    assert "2 ellipse fallbacks" in records[0].getMessage()


def test_own_outline_beats_severity():
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[2:11, 2] = 1  # vertical arm of A
    instances[7, 2:9] = 1  # horizontal arm of A, reaching into B's box
    instances[12, 6:15] = 2  # bottom arm of B
    instances[6:13, 14] = 2  # right arm of B
    maps = derive_granularities(make_region(instances, {1: LOW, 2: HIGH}), CLASS_MAP)
    bd = maps.instance_maps["bd"]

    # A's own pixels inside B's box stay A although B is more severe.
    assert (bd[7, 6:9] == 1).all()
    # Box overlap without any outline goes to the more severe B.
    assert (bd[8:11, 6:9] == 2).all()
    # The hidden part of A's box still counts in A's class union.
    assert maps.class_union["bd"][LOW, 8:11, 6:9].all()


@pytest.mark.parametrize(
    ("class_a", "class_b", "area_a_larger", "expected"),
    [
        (HIGH, LOW, True, 1),  # more severe wins although larger
        (LOW, HIGH, False, 2),
        (MID, MID, True, 2),  # same class: smaller nucleus wins
        (MID, MID, False, 1),
    ],
)
def test_overlap_severity_then_area(class_a, class_b, area_a_larger, expected):
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[2:11, 2] = 1
    instances[2, 2:11] = 1
    instances[12, 6:15] = 2
    instances[4:13, 14] = 2
    assert (instances == 1).sum() == (instances == 2).sum()
    if area_a_larger:
        instances[3, 3] = 1
    else:
        instances[11, 13] = 2
    maps = derive_granularities(make_region(instances, {1: class_a, 2: class_b}), CLASS_MAP)

    assert (maps.instance_maps["bd"][6:11, 6:11] == expected).all()


def test_overlap_equal_area_goes_to_smaller_id():
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[2:11, 2] = 7
    instances[2, 2:11] = 7
    instances[12, 6:15] = 3
    instances[4:13, 14] = 3
    maps = derive_granularities(make_region(instances, {7: MID, 3: MID}), CLASS_MAP)

    assert (instances == 7).sum() == (instances == 3).sum()
    assert (maps.instance_maps["bd"][6:11, 6:11] == 3).all()


# Two pieces of one nucleus, one pixel away from the right edge of a 30 x 30
# region, whose joint ellipse reaches past that edge.
CLIPPED_PIXELS = [
    (6, 26), (6, 27), (7, 23), (7, 24), (7, 25), (7, 26), (7, 27), (7, 28), (8, 22), (8, 23),
    (8, 24), (8, 25), (8, 26), (9, 20), (9, 21), (9, 22), (9, 23), (9, 24), (10, 21), (10, 22),
    (19, 24), (20, 24), (20, 25), (21, 23), (21, 24), (21, 25), (22, 23), (22, 24), (23, 24),
]


def test_edge_nucleus_is_cut_and_clipped():
    instances = np.zeros((30, 30), dtype=np.int32)
    instances[10:16, 0:4] = 1  # touches the left edge
    for y, x in CLIPPED_PIXELS:
        instances[y, x] = 2
    instances[12:17, 12:18] = 3  # well inside
    maps = derive_granularities(make_region(instances, {1: LOW, 2: LOW, 3: LOW}), CLASS_MAP)

    assert maps.cut.tolist() == [True, False, False]
    assert instances[:, 29].max() == 0
    outside = np.ones((50, 50), dtype=bool)
    outside[10:40, 10:40] = False
    expected_clipped = [bool(reference_ellipse(np.pad(instances, 10), i)[outside].any()) for i in (1, 2, 3)]
    assert expected_clipped == [False, True, False]
    assert maps.clipped["el"].tolist() == expected_clipped
    assert maps.clipped["bd"].tolist() == [True, False, False]
    assert maps.complete("pw").tolist() == [False, True, True]
    assert maps.complete("el").tolist() == [False, False, True]
    for granularity in GRANULARITIES:
        assert maps.instance_maps[granularity].shape == (30, 30)
        assert (maps.shape_boxes[granularity][:, 2] <= 29).all()
        assert (maps.shape_boxes[granularity][:, 0] >= 0).all()


def test_non_contiguous_nucleus_fits_all_pieces():
    instances = np.zeros((30, 30), dtype=np.int32)
    instances[5:9, 5:9] = 6
    instances[18:22, 18:22] = 6
    maps = derive_granularities(make_region(instances, {6: HIGH}), CLASS_MAP)

    ellipse = maps.instance_maps["el"] == 6
    assert np.array_equal(ellipse, reference_ellipse(instances, 6))
    # One ellipse spans both pieces, so it covers the gap between them too.
    assert ellipse[13, 13]
    assert maps.shape_boxes["bd"][0].tolist() == [5, 5, 21, 21]


def test_missing_class_raises():
    instances = np.zeros((8, 8), dtype=np.int32)
    instances[2:4, 2:4] = 3
    with pytest.raises(DatasetError, match="nucleus id 3 has no class"):
        derive_granularities(make_region(instances, {}), CLASS_MAP)


def test_negative_id_raises():
    instances = np.zeros((8, 8), dtype=np.int32)
    instances[2, 2] = -1
    with pytest.raises(DatasetError, match="negative id -1"):
        derive_granularities(make_region(instances, {-1: LOW}), CLASS_MAP)


def test_empty_region():
    maps = derive_granularities(make_region(np.zeros((8, 8), dtype=np.int32), {}), CLASS_MAP)

    assert maps.nucleus_ids.size == 0
    for granularity in GRANULARITIES:
        assert not maps.instance_maps[granularity].any()
        assert maps.class_union[granularity].shape == (3, 8, 8)


def test_consep_regions(consep_root):
    class_map = ClassMap.load(CONSEP_CLASS_MAP)
    for label_file in sorted((consep_root / "Train" / "Labels").glob("*.mat"))[:3]:
        labels = scipy.io.loadmat(label_file)
        instances = labels["inst_map"].astype(np.int32)
        types = labels["inst_type"].ravel()
        classes = {int(i): class_map.class_index(int(types[i - 1])) for i in np.unique(instances) if i != 0}
        maps = derive_granularities(make_region(instances, classes), class_map)

        assert np.array_equal(maps.instance_maps["pw"], instances)
        assert np.array_equal(maps.class_maps["pw"], labels["type_map"])
        foreground = instances != 0
        assert (maps.class_maps["bd"][foreground] != 0).all()
        assert maps.ellipse_fallbacks == len(maps.fallback_ids)
        assert maps.ellipse_fallbacks < len(maps.nucleus_ids) / 5
