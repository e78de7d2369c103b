"""End-to-end segmentation runs on a tiny synthetic dataset, tracked in an isolated MLflow store."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from granularity.data.class_map import ClassMap
from granularity.data.granularity import derive_granularities
from granularity.data.prepared import PreparedDataset
from granularity.data.region import Region
from granularity.errors import DatasetError
from granularity.training import segmentation

CLASS_MAP = Path(__file__).resolve().parents[1] / "mlproject" / "class_maps" / "consep.yaml"


def _synthetic_region(index: int, shape: tuple[int, int], class_map: ClassMap) -> Region:
    """Return a region with dark elliptic nuclei of several classes on a pink background."""
    rng = np.random.default_rng(index)
    image = np.full((*shape, 3), (230, 180, 200), dtype=np.uint8)
    instances = np.zeros(shape, dtype=np.int32)
    classes = {}
    for nucleus in range(6):
        centre = (int(rng.integers(8, shape[1] - 8)), int(rng.integers(8, shape[0] - 8)))
        axes = (int(rng.integers(3, 7)), int(rng.integers(3, 7)))
        instance_id = 10 * nucleus + 7  # non-contiguous ids
        cv2.ellipse(instances, centre, axes, float(rng.integers(0, 180)), 0, 360, instance_id, -1)
        classes[instance_id] = nucleus % class_map.num_classes
    image[instances > 0] = (90, 40, 120)
    present = {i: c for i, c in classes.items() if np.any(instances == i)}
    return Region(name=f"region_{index:02d}", group=f"tile_{index}", image=image, instances=instances, classes=present)


@pytest.fixture
def synthetic_prepared(monkeypatch) -> PreparedDataset:
    class_map = ClassMap.load(CLASS_MAP)
    shapes = [(64, 64)] * 5 + [(50, 70)]
    regions = [_synthetic_region(index, shape, class_map) for index, shape in enumerate(shapes)]
    maps = [derive_granularities(region, class_map) for region in regions]
    prepared = PreparedDataset(name="synthetic", digest="0" * 64, class_map=class_map, regions=regions, maps=maps, windows={})
    monkeypatch.setattr(segmentation, "prepare_dataset", lambda *args, **kwargs: prepared)
    return prepared


def _config(tmp_path, **overrides):
    config = {
        "dataset": str(tmp_path / "synthetic"),
        "class_map": str(CLASS_MAP),
        "granularity": "el",
        "model": "linknet",
        "encoder": "resnet18",
        "pretrained": "none",
        "epochs": 1,
        "batch_size": 4,
        "lr": 1e-3,
        "device": "cpu",
        "experiment": "test-segment",
    }
    config.update(overrides)
    return config


def _metric_names(class_names):
    names = ["pixel_accuracy", "dice", "nuclei_recall", "cancer_recall", "detection_f1", "pq"]
    names += [f"dice_{name}" for name in class_names]
    names += [f"detection_f1_{name}" for name in class_names] + [f"pq_{name}" for name in class_names]
    return names


@pytest.mark.slow
def test_segment_run_logs_metrics_and_artifacts(tracking_uri, tmp_path, synthetic_prepared):
    import mlflow
    from mlflow.tracking import MlflowClient

    run_id = segmentation.run_segmentation(_config(tmp_path))
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["task"] == "segmentation"
    assert run.data.tags["granularity"] == "el"
    assert run.data.tags["model"] == "linknet"

    names = _metric_names(synthetic_prepared.class_map.names)
    for name in names:
        assert f"test_{name}" in run.data.metrics, name
        assert f"own_test_{name}" in run.data.metrics, name
    for name in ("train_loss", "val_loss", "val_dice"):
        history = client.get_metric_history(run_id, name)
        assert [metric.step for metric in history] == [1], name

    # Every test region has a prediction PNG.
    artifacts = [item.path for item in client.list_artifacts(run_id, "predictions")]
    assert artifacts, "no prediction masks logged"
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions", dst_path=str(tmp_path / "out")))
    by_name = {region.name: (region, maps) for region, maps in zip(synthetic_prepared.regions, synthetic_prepared.maps)}
    predictions, truths = [], []
    for path in sorted(local.glob("*.png")):
        region, maps = by_name[path.stem]
        prediction = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert prediction.shape == region.shape
        assert prediction.max() <= synthetic_prepared.class_map.num_classes
        predictions.append(prediction.ravel())
        truths.append(maps.class_maps["pw"].ravel())

    # test_ metrics are against the pixel-wise truth: recount pixel accuracy from the logged masks.
    prediction, truth = np.concatenate(predictions), np.concatenate(truths)
    assert run.data.metrics["test_pixel_accuracy"] == pytest.approx(np.mean(prediction == truth))
    nucleus = truth > 0
    assert run.data.metrics["test_nuclei_recall"] == pytest.approx(np.mean(prediction[nucleus] > 0))

    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "model")))
    class_map_files = list(model_dir.rglob("class_map.json"))
    assert class_map_files
    assert json.loads(class_map_files[0].read_text())["classes"][0]["name"] == "other"
    assert list(model_dir.rglob("segmenter.json"))
    assert [item.path for item in client.list_artifacts(run_id, "figures")] == ["figures/segmentation_example.png"]


@pytest.mark.slow
def test_segment_resume_after_interrupt(tracking_uri, tmp_path, synthetic_prepared, monkeypatch):
    from mlflow.tracking import MlflowClient

    original = segmentation.make_evaluate

    def interrupting_evaluate(criterion):
        evaluate = original(criterion)
        calls = {"count": 0}

        def wrapped(model, batches):
            calls["count"] += 1
            if calls["count"] == 2:
                raise KeyboardInterrupt
            return evaluate(model, batches)

        return wrapped

    monkeypatch.setattr(segmentation, "make_evaluate", interrupting_evaluate)
    config = _config(tmp_path, epochs=2, model="unet", tile_size=32)
    with pytest.raises(KeyboardInterrupt):
        segmentation.run_segmentation(config)

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("test-segment").experiment_id])[0]
    assert run.info.status == "KILLED"

    monkeypatch.setattr(segmentation, "make_evaluate", original)
    run_id = segmentation.run_segmentation({"device": "cpu"}, resume_run_id=run.info.run_id)
    assert run_id == run.info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    for name in ("train_loss", "val_dice"):
        steps = [metric.step for metric in client.get_metric_history(run_id, name)]
        assert sorted(steps) == [1, 2], name


def test_mask_value_outside_class_map_raises(synthetic_prepared):
    synthetic_prepared.maps[0].class_maps["el"][0, 0] = 9
    with pytest.raises(DatasetError, match="region_00.*value 9"):
        segmentation.check_masks(synthetic_prepared, "el", [0, 1])


def test_absent_training_class_warns(synthetic_prepared, caplog):
    for maps in synthetic_prepared.maps[:2]:
        maps.class_maps["pw"][maps.class_maps["pw"] == 4] = 1
    with caplog.at_level(logging.WARNING):
        absent = segmentation.warn_absent_classes(synthetic_prepared, "pw", [0, 1])
    assert absent == ["spindle"]
    assert "spindle" in caplog.text


def test_region_dataset_pads_with_ignore():
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    mask = np.ones((50, 70), dtype=np.uint8)
    dataset = segmentation.RegionDataset([image], [mask])
    tensor, target = dataset[0]
    assert tuple(tensor.shape) == (3, 64, 96)
    assert int((target == 1).sum()) == 50 * 70
    assert int((target == segmentation.IGNORE_INDEX).sum()) == 64 * 96 - 50 * 70


def test_tiny_region_padded_to_training_minimum():
    dataset = segmentation.RegionDataset([np.zeros((5, 3, 3), dtype=np.uint8)], [np.zeros((5, 3), dtype=np.uint8)])
    tensor, target = dataset[0]
    assert tuple(tensor.shape) == (3, 64, 64)
    assert int((target == 0).sum()) == 15


@pytest.mark.parametrize(
    ("override", "message"),
    [({"model": "deeplab"}, "invalid model"), ({"loss": "focal"}, "invalid loss"), ({"tile_size": 100}, "tile_size"), ({"epochs": 0}, "invalid epochs")],
)
def test_invalid_config_raises(tmp_path, override, message):
    from granularity.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        segmentation.resolve_config(_config(tmp_path, **override))


def test_validation_dice_counts_pixels():
    import torch

    evaluate = segmentation.make_evaluate(segmentation.build_loss("ce"))

    class Fixed(torch.nn.Module):
        def forward(self, images):
            logits = torch.zeros((images.shape[0], 2, 2, 2))
            logits[:, 1, 0, :] = 5.0  # predicts nucleus in the top row
            return logits

    masks = torch.tensor([[[1, 0], [1, segmentation.IGNORE_INDEX]]])
    metrics = evaluate(Fixed(), [(torch.zeros(1, 3, 2, 2), masks)])
    # Truth nucleus 2 px, predicted nucleus 2 px, overlap 1 px.
    assert metrics["val_dice"] == pytest.approx(2 * 1 / (2 + 2))
    assert not math.isnan(metrics["val_loss"])
