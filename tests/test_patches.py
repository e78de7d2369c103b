"""Window labels and the discard rule, checked against a brute-force loop over windows and nuclei."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from granularity.data.class_map import ClassMap
from granularity.data.granularity import GRANULARITIES, derive_granularities
from granularity.data.patches import extract_patch, label_all_windows, label_windows, window_positions
from granularity.data.region import Region
from granularity.errors import ConfigError

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
    image = np.zeros(instances.shape + (3,), dtype=np.uint8)
    return Region(name="r", group="g", image=image, instances=instances.astype(np.int32), classes=classes)


def random_region(seed: int, height: int = 48, width: int = 56) -> Region:
    rng = np.random.default_rng(seed)
    instances = np.zeros((height, width), dtype=np.int32)
    for nucleus_id in rng.choice(np.arange(1, 900), size=12, replace=False):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(1, 7)), int(rng.integers(1, 5)))
        cv2.ellipse(instances, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(nucleus_id), -1)
    classes = {int(i): int(rng.integers(0, 3)) for i in np.unique(instances) if i != 0}
    return make_region(instances, classes)


def brute_force_shapes(region: Region, maps, granularity: str, pad: int = 20) -> list[np.ndarray]:
    """Return each nucleus's unclipped shape on a canvas padded by ``pad`` on every side."""
    height, width = region.shape
    yy, xx = np.mgrid[-pad : height + pad, -pad : width + pad]
    shapes = []
    for n, nucleus_id in enumerate(maps.nucleus_ids):
        own = np.pad(region.instances == nucleus_id, pad)
        if granularity == "pw":
            shapes.append(own)
        elif granularity == "bd":
            ys, xs = np.nonzero(own)
            shapes.append((yy >= ys.min() - pad) & (yy <= ys.max() - pad) & (xx >= xs.min() - pad) & (xx <= xs.max() - pad))
        else:
            cx, cy, w, h, angle = maps.ellipses[n]
            t = np.radians(angle)
            u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / (w / 2 + 0.5)
            v = ((yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)) / (h / 2 + 0.5)
            shapes.append(u**2 + v**2 <= 1)
    return shapes


def brute_force_windows(region: Region, maps, granularity: str, size: int, stride: int) -> list[tuple[int, int, int]]:
    pad = 20
    height, width = region.shape
    shapes = brute_force_shapes(region, maps, granularity, pad)
    severity = CLASS_MAP.severities
    kept = []
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            label, has_complete = None, False
            for n, shape in enumerate(shapes):
                inside_region = shape[pad : pad + height, pad : pad + width]
                in_window = inside_region[y : y + size, x : x + size]
                if not in_window.any():
                    continue
                class_index = int(maps.nucleus_classes[n])
                if label is None or severity[class_index] > severity[label]:
                    label = class_index
                ys, xs = np.nonzero(region.instances == maps.nucleus_ids[n])
                touches_edge = ys.min() == 0 or xs.min() == 0 or ys.max() == height - 1 or xs.max() == width - 1
                whole = in_window.sum() == shape.sum()
                has_complete |= whole and not touches_edge
            if has_complete:
                kept.append((x, y, label))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize(("size", "stride"), [(16, None), (24, 10), (32, 16)])
def test_labels_match_brute_force(seed, granularity, size, stride):
    region = random_region(seed)
    maps = derive_granularities(region, CLASS_MAP)
    table = label_windows(maps, granularity, size, stride)

    expected = brute_force_windows(region, maps, granularity, size, stride or size // 2)
    assert list(table.columns) == ["x", "y", "size", "label"]
    assert list(zip(table.x, table.y, table.label)) == expected
    assert (table["size"] == size).all()


def test_window_grid_stays_inside():
    assert window_positions(256, 128, 64).tolist() == [0, 64, 128]
    assert window_positions(100, 32, 16).tolist() == [0, 16, 32, 48, 64]
    assert window_positions(20, 32, 16).tolist() == []


def test_only_windows_with_whole_nucleus_kept():
    instances = np.zeros((40, 40), dtype=np.int32)
    instances[12:18, 12:18] = 1  # 6 x 6 square
    maps = derive_granularities(make_region(instances, {1: MID}), CLASS_MAP)
    table = label_windows(maps, "pw", patch_size=16, stride=4)

    # The square lies in a 16-window starting at x when x <= 12 and x + 15 >= 17.
    expected = [(x, y) for y in range(0, 25, 4) for x in range(0, 25, 4) if 2 <= x <= 12 and 2 <= y <= 12]
    assert list(zip(table.x, table.y)) == expected
    assert (table.label == MID).all()


def test_edge_nucleus_never_complete():
    instances = np.zeros((32, 32), dtype=np.int32)
    instances[0:4, 10:14] = 1  # touches the top edge
    maps = derive_granularities(make_region(instances, {1: HIGH}), CLASS_MAP)

    for granularity in GRANULARITIES:
        assert label_windows(maps, granularity, 16).empty


def test_box_reaching_into_window_sets_label():
    instances = np.zeros((32, 32), dtype=np.int32)
    instances[20:24, 4:8] = 1  # low nucleus, whole inside window (0, 16)
    for i in range(16):
        instances[10 + i, 10 + i] = 2  # high diagonal nucleus whose box reaches into that window
    maps = derive_granularities(make_region(instances, {1: LOW, 2: HIGH}), CLASS_MAP)

    assert not (instances[16:32, 0:16] == 2).any()
    pw = label_windows(maps, "pw", 16, 16).set_index(["x", "y"]).label
    bd = label_windows(maps, "bd", 16, 16).set_index(["x", "y"]).label
    assert pw[(0, 16)] == LOW
    assert bd[(0, 16)] == HIGH


def test_label_all_windows_matches_per_region():
    regions = [random_region(seed) for seed in (4, 5)]
    maps = [derive_granularities(region, CLASS_MAP) for region in regions]
    tables = label_all_windows(maps, patch_sizes=(16, 32), granularities=("pw", "bd"))

    assert set(tables) == {(16, "pw"), (16, "bd"), (32, "pw"), (32, "bd")}
    for (size, granularity), table in tables.items():
        expected = pd.concat(
            [label_windows(m, granularity, size).assign(region=i) for i, m in enumerate(maps)], ignore_index=True
        )[["region", "x", "y", "size", "label"]]
        pd.testing.assert_frame_equal(table, expected, check_dtype=False)


def test_invalid_patch_size_raises():
    maps = derive_granularities(random_region(0), CLASS_MAP)
    with pytest.raises(ConfigError, match="patch size 0"):
        label_windows(maps, "pw", 0)
    with pytest.raises(ConfigError, match="stride -2"):
        label_windows(maps, "pw", 16, -2)
    with pytest.raises(ConfigError, match="granularity 'xy'"):
        label_windows(maps, "xy", 16)


def test_extract_patch():
    image = np.arange(10 * 12 * 3).reshape(10, 12, 3)
    patch = extract_patch(image, x=2, y=3, size=4)

    assert patch.shape == (4, 4, 3)
    assert (patch == image[3:7, 2:6]).all()
    with pytest.raises(ValueError, match="does not fit"):
        extract_patch(image, x=10, y=0, size=4)
