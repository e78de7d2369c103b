"""End-to-end classification runs on a small synthetic CoNSeP-layout dataset, tracked in a temporary MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.io
from mlflow.tracking import MlflowClient
from sklearn.metrics import f1_score, precision_score, recall_score

import granularity.training.classification as classification
from granularity.cli import main
from granularity.data.augment import dihedral
from granularity.errors import UserError
from granularity.training.classification import run_classification, study_variant

CLASS_MAP = """
name: synthetic
classes:
  - {name: pale, color: "#ffffff", severity: 0, tumour: false}
  - {name: dark, color: "#ff0000", severity: 1, tumour: true}
labels:
  1: pale
  2: dark
"""

REGIONS = 12
SIDE = 64


def _write_dataset(root: Path) -> None:
    """Write 12 regions of 64 x 64 px, one tile each; regions alternate between pale and dark nuclei."""
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(REGIONS):
        raw_class = 1 + index % 2
        image = np.full((SIDE, SIDE, 3), (230, 180, 200), dtype=np.uint8)
        instances = np.zeros((SIDE, SIDE), dtype=np.int32)
        nucleus_id = 0
        for cy in range(8, SIDE, 16):
            for cx in range(8, SIDE, 16):
                nucleus_id += 1
                cv2.circle(instances, (cx, cy), 4, nucleus_id, thickness=-1)
        colour = (150, 90, 160) if raw_class == 1 else (40, 20, 90)
        image[instances > 0] = colour
        noise = generator.integers(-10, 10, size=image.shape)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)

        name = f"tile{index}_000"
        cv2.imwrite(str(root / "Images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        inst_type = np.full((nucleus_id, 1), raw_class, dtype=np.int32)
        scipy.io.savemat(root / "Labels" / f"{name}.mat", {"inst_map": instances, "inst_type": inst_type})


@pytest.fixture
def synthetic_config(tmp_path, tracking_uri) -> dict:
    dataset = tmp_path / "synthetic"
    _write_dataset(dataset)
    class_map = tmp_path / "synthetic.yaml"
    class_map.write_text(CLASS_MAP)
    return {
        "dataset": str(dataset),
        "format": "consep",
        "class_map": str(class_map),
        "granularity": "bd",
        "patch_size": 32,
        "model": "mobilenet_v2",
        "pretrained": "none",
        "epochs": 2,
        "batch_size": 32,
        "seed": 3,
        "augment": "none",
        "input_size": 16,
        "device": "cpu",
        "num_workers": 0,
        "cache_dir": str(tmp_path / "cache"),
    }


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def _cli_arguments(config: dict) -> list[str]:
    arguments = ["classify"]
    for key, value in config.items():
        arguments += [f"--{key.replace('_', '-')}", str(value)]
    return arguments


def test_classify_cli_logs_metrics_tags_artifacts(synthetic_config, tmp_path):
    assert main(_cli_arguments(synthetic_config)) == 0

    client = MlflowClient()
    [run] = mlflow.search_runs(experiment_names=["annotation-granularity"], output_format="list")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    for key in ("train_loss", "val_loss", "val_f1"):
        assert _steps(client, run_id, key) == [1, 2], key
    for prefix in ("test_", "own_test_"):
        for name in ("precision", "recall", "f1", "accuracy", "class_accuracy_pale", "class_accuracy_dark"):
            assert prefix + name in run.data.metrics, prefix + name

    tags = run.data.tags
    assert tags["task"] == "classification"
    assert tags["granularity"] == "bd"
    assert tags["model"] == "mobilenet_v2"
    assert tags["patch_size"] == "32"
    assert tags["dataset"] == "synthetic"
    assert len(tags["dataset_digest"]) >= 16
    assert tags["git_commit"]
    assert len(tags["config_key"]) == 16
    assert run.data.params["lr"] == "0.001"
    assert run.data.params["granularity"] == "bd"

    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"config.json", "class_map.json", "test_predictions.csv", "test_confusion_matrix.png", "own_test_predictions.csv"} <= artifacts
    checkpoints = {artifact.path for artifact in client.list_artifacts(run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/last.pt", "checkpoints/best.pt"}
    assert (tmp_path / "checkpoints" / run_id / "last.pt").is_file()

    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic"
    assert tags["dataset_digest"].startswith(dataset_input.dataset.digest)

    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [model.source_run_id for model in models] == [run_id]

    # The test metrics must agree with scikit-learn on the logged predictions.
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv"))
    assert list(predictions.columns) == ["region", "x", "y", "size", "true_label", "predicted_label", "probability_pale", "probability_dark"]
    np.testing.assert_allclose(predictions[["probability_pale", "probability_dark"]].sum(axis=1), 1.0, atol=1e-4)
    true, predicted = predictions["true_label"], predictions["predicted_label"]
    present = sorted(set(true) | set(predicted))
    assert run.data.metrics["test_f1"] == pytest.approx(f1_score(true, predicted, labels=present, average="macro", zero_division=0), abs=1e-6)
    assert run.data.metrics["test_precision"] == pytest.approx(precision_score(true, predicted, labels=present, average="macro", zero_division=0), abs=1e-6)
    assert run.data.metrics["test_recall"] == pytest.approx(recall_score(true, predicted, labels=present, average="macro", zero_division=0), abs=1e-6)
    assert run.data.metrics["test_windows"] == len(predictions)


def test_classify_resume_after_interrupt(synthetic_config, monkeypatch):
    config = synthetic_config
    uninterrupted_id = run_classification(config)
    uninterrupted = MlflowClient().get_run(uninterrupted_id).data.metrics

    # Interrupt the second batch of the second epoch: 90 training windows make 3 batches per epoch.
    calls = {"count": 0}
    original_step = classification.classification_step

    def interrupted_step(model, batch):
        calls["count"] += 1
        if calls["count"] == 5:
            raise KeyboardInterrupt
        return original_step(model, batch)

    monkeypatch.setattr(classification, "classification_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run_classification(config)
    client = MlflowClient()
    [killed] = client.search_runs([client.get_experiment_by_name("annotation-granularity").experiment_id], "attributes.status = 'KILLED'")
    run_id = killed.info.run_id
    assert _steps(client, run_id, "train_loss") == [1]
    monkeypatch.setattr(classification, "classification_step", original_step)

    assert run_classification({"device": "cpu"}, resume_run_id=run_id) == run_id

    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert "failure_reason" not in resumed.data.tags
    for key in ("train_loss", "val_loss", "val_f1", "test_f1", "train_windows"):
        expected = [1, 2] if key in ("train_loss", "val_loss", "val_f1") else [0]
        assert _steps(client, run_id, key) == expected, key
    # Random states are restored from the checkpoint and CPU runs are deterministic,
    # so the resumed run repeats the uninterrupted one.
    for key in ("train_loss", "val_f1", "test_f1"):
        assert resumed.data.metrics[key] == pytest.approx(uninterrupted[key], abs=1e-6), key


def test_classify_nan_loss_marks_run_failed(synthetic_config, monkeypatch):
    monkeypatch.setattr(classification, "classification_step", lambda model, batch: model(batch[0]).sum() * float("nan"))

    with pytest.raises(UserError, match="loss became nan"):
        run_classification(synthetic_config)

    [run] = mlflow.search_runs(experiment_names=["annotation-granularity"], output_format="list")
    assert run.info.status == "FAILED"
    assert "loss became nan" in run.data.tags["failure_reason"]


def test_classify_unreachable_server_fails_before_training(synthetic_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(classification, "prepare_dataset", lambda *args, **kwargs: pytest.fail("data read before the server check"))

    with pytest.raises(UserError, match="127.0.0.1:9"):
        run_classification(synthetic_config)


def test_classify_empty_class_names_class(synthetic_config, tmp_path):
    class_map = tmp_path / "three.yaml"
    class_map.write_text(CLASS_MAP.replace("labels:", "  - {name: absent, color: \"#00ff00\", severity: 2, tumour: false}\nlabels:"))

    with pytest.raises(UserError, match="absent"):
        run_classification(dict(synthetic_config, class_map=str(class_map)))
    assert mlflow.search_runs(experiment_names=["annotation-granularity"], output_format="list") == []


def test_classify_unknown_model_lists_valid_ones(synthetic_config):
    with pytest.raises(UserError, match="resnet18, vgg16, mobilenet, mobilenet_v2"):
        run_classification(dict(synthetic_config, model="alexnet"))


def test_study_variant_dihedral_and_jitter():
    patch = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)

    for variant in range(8):
        np.testing.assert_array_equal(study_variant(patch, variant), dihedral(patch, variant))
    for variant in range(8, 16):
        jittered = study_variant(patch, variant)
        assert jittered.shape == patch.shape
        assert not np.array_equal(jittered, dihedral(patch, variant - 8))
