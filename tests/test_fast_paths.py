"""The fast paths of prepare checked against their plain forms: tracing, fitting, rebuilding, labelling, caching."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from granularity.data.class_map import ClassMap
from granularity.data.granularity import GRANULARITIES, FIT_KINDS, derive_granularities, fit_ellipse
from granularity.data.patches import region_windows, window_labels
from granularity.data.prepared import prepare_dataset
from granularity.data.region import Region

from conftest import CLASS_MAPS

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

LOW_CLASS = 1

# An L-shaped outline of 8 nearly collinear contour points, for which
# cv2.fitEllipse (OpenCV 5.1) jitters the points with its global RNG.
NEARLY_COLLINEAR = [(4, 0), (0, 1), (1, 1), (2, 1), (3, 1)]


def make_region(instances: np.ndarray, classes: dict[int, int]) -> Region:
    instances = np.asarray(instances, dtype=np.int32)
    image = np.zeros(instances.shape + (3,), dtype=np.uint8)
    return Region(name="r", group="g", image=image, instances=instances, classes=classes, source="synthetic")


def crowded_region(seed: int) -> Region:
    """Draw touching and overlapping ellipses, rings with holes, and one nucleus in scattered pieces."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((48, 56), dtype=np.int32)
    ids = rng.choice(np.arange(1, 400), size=30, replace=False)
    for index, nucleus_id in enumerate(ids):
        centre = (int(rng.integers(0, 56)), int(rng.integers(0, 48)))
        axes = (int(rng.integers(1, 8)), int(rng.integers(1, 5)))
        thickness = 1 if index % 5 == 0 else -1
        cv2.ellipse(instances, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(nucleus_id), thickness)
    instances[rng.random(instances.shape) < 0.01] = int(ids[0])
    classes = {int(i): int(rng.integers(0, 3)) for i in np.unique(instances) if i != 0}
    return make_region(instances, classes)


def crop_fits(region: Region) -> tuple[np.ndarray, list[str]]:
    """Fit every nucleus on its own crop with ``fit_ellipse``, the plain way."""
    rows, kinds = [], []
    for index, box in enumerate(ndimage.find_objects(region.instances)):
        if box is None:
            continue
        mask = (region.instances[box] == index + 1).view(np.uint8)
        ellipse, kind = fit_ellipse(mask, box[1].start, box[0].start)
        rows.append((ellipse.cx, ellipse.cy, ellipse.width, ellipse.height, ellipse.angle))
        kinds.append(kind)
    return np.array(rows), kinds


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_traced_contours_fit_like_crops(seed):
    region = crowded_region(seed)
    maps = derive_granularities(region, CLASS_MAP)
    expected, kinds = crop_fits(region)

    # derive also turns a fit that covers no pixel centre into a fallback, so only its fits are compared.
    fitted = maps.fit_kinds == FIT_KINDS.index("fit")
    assert fitted.sum() > 20
    assert np.array_equal(maps.ellipses[fitted], expected[fitted])
    for kind, crop_kind in zip(maps.fit_kinds.tolist(), kinds):
        if crop_kind != "fit":
            assert FIT_KINDS[kind] == crop_kind
    assert maps.shape_boxes["pw"].tolist() == [
        [box[1].start, box[0].start, box[1].stop - 1, box[0].stop - 1] for box in ndimage.find_objects(region.instances) if box is not None
    ]


def test_fit_ignores_rng_state():
    instances = np.zeros((10, 10), dtype=np.int32)
    for x, y in NEARLY_COLLINEAR:
        instances[3 + y, 2 + x] = 7
    region = make_region(instances, {7: LOW_CLASS})

    results = set()
    for seed in range(20):
        # Move OpenCV's global RNG to another state, as other calls would.
        cv2.setRNGSeed(seed)
        cv2.randu(np.empty(seed + 1, dtype=np.float32), 0.0, 1.0)
        maps = derive_granularities(region, CLASS_MAP)
        results.add((tuple(maps.ellipses[0].tolist()), int(maps.fit_kinds[0])))
    assert len(results) == 1


@pytest.mark.parametrize("seed", [4, 5])
def test_rebuild_from_ellipses_equals_derive(seed):
    region = crowded_region(seed)
    derived = derive_granularities(region, CLASS_MAP)
    rebuilt = derive_granularities(region, CLASS_MAP, ellipses=derived.ellipses, fit_kinds=derived.fit_kinds)

    for field in ("instance_maps", "class_maps", "class_union", "shape_boxes", "clipped"):
        for granularity in GRANULARITIES:
            assert np.array_equal(getattr(derived, field)[granularity], getattr(rebuilt, field)[granularity]), (field, granularity)
    assert np.array_equal(derived.ellipses, rebuilt.ellipses)
    assert derived.fallback_ids == rebuilt.fallback_ids
    assert (derived.tiny_fallbacks, derived.degenerate_fallbacks) == (rebuilt.tiny_fallbacks, rebuilt.degenerate_fallbacks)


def test_rebuild_rejects_wrong_count():
    region = crowded_region(6)
    derived = derive_granularities(region, CLASS_MAP)
    with pytest.raises(ValueError, match="ellipses"):
        derive_granularities(region, CLASS_MAP, ellipses=derived.ellipses[1:], fit_kinds=derived.fit_kinds[1:])


@pytest.mark.parametrize(("sizes", "stride"), [((8, 16, 32), None), ((12, 20), 5), ((16,), 3)])
def test_region_windows_equal_window_labels(sizes, stride):
    for seed in (7, 8):
        maps = derive_granularities(crowded_region(seed), CLASS_MAP)
        together = region_windows(maps, sizes, GRANULARITIES, stride)

        assert set(together) == {(size, granularity) for size in sizes for granularity in GRANULARITIES}
        for (size, granularity), windows in together.items():
            alone = window_labels(maps, granularity, size, stride)
            assert windows.x.tolist() == alone.x.tolist()
            assert windows.y.tolist() == alone.y.tolist()
            assert windows.label.tolist() == alone.label.tolist()


def test_unreadable_cache_file_is_derived_again(pannuke_root, tmp_path):
    class_map = CLASS_MAPS / "pannuke.yaml"
    first = prepare_dataset(pannuke_root, "coco", class_map, patch_sizes=(64,), cache_root=tmp_path)
    (first.cache_dir / "fits.npz").write_bytes(b"not a zip file")
    second = prepare_dataset(pannuke_root, "coco", class_map, patch_sizes=(64,), cache_root=tmp_path)

    assert not second.cache_hit
    for granularity in GRANULARITIES:
        pd.testing.assert_frame_equal(first.windows[(64, granularity)], second.windows[(64, granularity)])
    for a, b in zip(first.maps, second.maps):
        assert np.array_equal(a.instance_maps["el"], b.instance_maps["el"])
