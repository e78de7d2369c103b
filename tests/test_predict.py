"""GeoJSON writing and ``granularity predict`` with a logged model, read back by the project's GeoJSON reader."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from granularity.data.class_map import ClassMap
from granularity.data.geojson_writer import MIN_NUCLEUS_AREA_PX, nucleus_features, write_geojson
from granularity.metrics.segmentation import label_instances

# Class names double as raw labels here, so the reader maps each feature's classification back.
CLASS_MAP = ClassMap.from_dict(
    {
        "name": "two-class",
        "classes": [
            {"name": "normal", "color": "#ffffff", "severity": 0, "tumour": False},
            {"name": "tumour", "color": "#ffd700", "severity": 1, "tumour": True},
        ],
    }
)


class ColourThreshold(nn.Module):
    """Predict class 1 on red pixels, class 2 on blue pixels and background elsewhere, at any input size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([0.0, -1.0, -1.0]))
            self.conv.weight[1, 0] = 2.0  # red
            self.conv.weight[2, 2] = 2.0  # blue

    def forward(self, x):
        return self.conv(x)


def _hand_made_mask() -> np.ndarray:
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[2:8, 2:9] = 1  # rectangle
    cv2.circle(mask, (25, 12), 6, 2, -1)  # disc
    mask[20:30, 5:15] = 1  # square with a hole
    mask[24:26, 9:11] = 0
    mask[33, 40] = 2  # one pixel
    mask[35:40, 43:48] = 2  # touches the bottom-right edge
    mask[30, 20] = 1  # diagonal neighbours: two nuclei under 4-connectivity
    mask[31, 21] = 1
    mask[14:18, 30:34] = 1  # two classes touching: two nuclei
    mask[14:18, 34:38] = 2
    return mask


def _read_back(folder: Path, class_map: ClassMap):
    try:
        from granularity.data.readers import read_regions
    except ImportError as error:  # the reader is developed separately
        pytest.skip(f"GeoJSON reader not importable yet: {error}")
    return read_regions(folder, "geojson", class_map)


def _filled_components(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Return (class value, hole-filled pixel mask) per 4-connected component, computed with scikit-image."""
    from skimage.measure import label

    components = []
    for value in (1, 2):
        labels = label(mask == value, connectivity=1)
        for index in range(1, labels.max() + 1):
            components.append((value, ndimage.binary_fill_holes(labels == index)))
    return components


def test_features_per_component():
    mask = _hand_made_mask()
    features = nucleus_features(label_instances(mask), mask, CLASS_MAP)
    expected = [(value, part) for value, part in _filled_components(mask) if part.sum() >= MIN_NUCLEUS_AREA_PX]
    assert len(features) == len(expected)
    names = sorted(feature["properties"]["classification"]["name"] for feature in features)
    assert names == sorted(CLASS_MAP.names[value - 1] for value, _ in expected)
    for feature in features:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert ring[0] == ring[-1]
        assert feature["properties"]["classification"]["color"] in ([255, 255, 255], [255, 215, 0])


def test_geojson_round_trip_through_reader(tmp_path):
    mask = _hand_made_mask()
    image = np.zeros((*mask.shape, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "tile.png"), image)
    count = write_geojson(tmp_path / "tile.geojson", label_instances(mask), mask, CLASS_MAP)

    (region,) = _read_back(tmp_path, CLASS_MAP)
    expected = [(value, part) for value, part in _filled_components(mask) if part.sum() >= MIN_NUCLEUS_AREA_PX]
    assert count == len(expected)
    assert len(region.instance_ids()) == len(expected)

    # Every written nucleus comes back with its pixels (hole filled) and its class.
    for value, pixels in expected:
        ids, counts = np.unique(region.instances[pixels], return_counts=True)
        instance_id = int(ids[np.argmax(counts)])
        assert instance_id != 0
        assert np.array_equal(region.instances == instance_id, pixels)
        assert region.classes[instance_id] == value - 1


def test_geojson_rejects_values_outside_class_map(tmp_path):
    from granularity.errors import UserError

    mask = np.full((4, 4), 3, dtype=np.uint8)
    with pytest.raises(UserError, match="only 2 classes"):
        write_geojson(tmp_path / "x.geojson", label_instances(mask), mask, CLASS_MAP)


def _logged_model(tmp_path, tracking_uri: str) -> str:
    import mlflow

    from granularity.training.segmentation import log_segmenter

    # Earlier tests may have pointed MLflow at their own store; log into this test's store.
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run() as run:
        config = {"model": "unet", "encoder": "resnet18", "granularity": "pw", "tile_size": 64}
        log_segmenter(ColourThreshold(), CLASS_MAP, config, tmp_path)
    return f"runs:/{run.info.run_id}/model"


def _blob_image(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return an RGB image with red and blue blobs on grey, and the class mask the threshold model predicts."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(5):
        value = int(rng.integers(1, 3))
        centre = (int(rng.integers(5, width - 5)), int(rng.integers(5, height - 5)))
        cv2.circle(mask, centre, int(rng.integers(2, 6)), value, -1)
    image[mask == 1] = (255, 0, 0)
    image[mask == 2] = (0, 0, 255)
    return image, mask


def test_predict_command_writes_files(tracking_uri, tmp_path):
    from granularity.cli import main

    model_uri = _logged_model(tmp_path / "logged", tracking_uri)
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    truths = {}
    for seed, shape in enumerate([(100, 150), (64, 64), (37, 250)]):
        image, mask = _blob_image(*shape, seed)
        cv2.imwrite(str(images_dir / f"image_{seed}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        truths[f"image_{seed}"] = mask

    out = tmp_path / "out"
    assert main(["predict", "--model-uri", model_uri, "--images", str(images_dir), "--out", str(out), "--device", "cpu"]) == 0

    for stem, truth in truths.items():
        mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, truth)
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay.shape == (*truth.shape, 3)
        features = json.loads((out / f"{stem}.geojson").read_text())["features"]
        assert len(features) == len(_filled_components(truth))

    # The reader pairs each GeoJSON file with the image of the same stem.
    readable = tmp_path / "readable"
    readable.mkdir()
    for stem in truths:
        (readable / f"{stem}.png").write_bytes((images_dir / f"{stem}.png").read_bytes())
        (readable / f"{stem}.geojson").write_bytes((out / f"{stem}.geojson").read_bytes())
    regions = {region.name: region for region in _read_back(readable, CLASS_MAP)}
    for stem, truth in truths.items():
        expected = _filled_components(truth)
        assert len(regions[stem].instance_ids()) == len(expected), stem


def test_predict_unknown_model_uri(tracking_uri, tmp_path):
    from granularity.cli import main

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    cv2.imwrite(str(images_dir / "a.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    assert main(["predict", "--model-uri", "runs:/0123456789abcdef/model", "--images", str(images_dir), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2


def test_predict_empty_folder(tracking_uri, tmp_path):
    from granularity.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model-uri", "runs:/x/model", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_geojson_leaves_out_speckle():
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[2, 2] = 1  # a single pixel
    instances[5, 3:8] = 2  # a one-pixel-wide line: its ring has no area
    cv2.circle(instances, (13, 13), 4, 3, -1)
    class_mask = (instances > 0).astype(np.uint8)
    features = nucleus_features(instances, class_mask, CLASS_MAP, min_area=1)

    assert len(features) == 1
    ring = features[0]["geometry"]["coordinates"][0]
    assert len(ring) >= 4
    assert ring[0] == ring[-1]
