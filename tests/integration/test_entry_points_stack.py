"""The entry points against the tracking stack: prepare, classify, segment and compare, and `mlflow run`.

The runs use a tiny synthetic dataset and a client configured with only
``MLFLOW_TRACKING_URI``. Their artifacts are then looked up in the S3 bucket
with boto3, without going through the MLflow server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from granularity.cli import main

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

CLASSIFY_OPTIONS = {
    "granularity": "bd",
    "patch_size": "32",
    "model": "mobilenet_v2",
    "pretrained": "none",
    "epochs": "1",
    "batch_size": "32",
    "augment": "none",
    "input_size": "16",
    "device": "cpu",
    "num_workers": "0",
}


def _options(values: dict[str, str]) -> list[str]:
    arguments = []
    for key, value in values.items():
        arguments += [f"--{key.replace('_', '-')}", value]
    return arguments


def _run_artifact_keys(bucket_keys, run) -> set[str]:
    """Return the run's artifact paths as stored in the bucket: s3://<bucket>/<experiment id>/<run id>/artifacts/<path>."""
    prefix = f"{run.info.experiment_id}/{run.info.run_id}/artifacts/"
    return {key[len(prefix):] for key in bucket_keys(prefix)}


def _listed_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Return every artifact file of a run as the MLflow server lists it, recursively."""
    files = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            files |= _listed_artifacts(client, run_id, item.path)
        else:
            files.add(item.path)
    return files


def _only_run(client: MlflowClient, experiment_id: str, task: str):
    runs = client.search_runs([experiment_id], f"tags.task = '{task}'")
    assert len(runs) == 1, f"{len(runs)} {task} runs"
    return runs[0]


def test_entry_points_store_artifacts_in_bucket(tracking_stack, stack_tracking_uri, tiny_consep, bucket_keys, tmp_path, monkeypatch):
    dataset, class_map = tiny_consep
    experiment = "stack-entry-points"
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("GRANULARITY_CACHE", cache)
    # The CLI sets the HTTP retry defaults in this process; setenv then delenv removes them again after the test.
    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(variable, "0")
        monkeypatch.delenv(variable)
    common = ["--dataset", str(dataset), "--format", "consep", "--class-map", str(class_map), "--experiment", experiment]

    assert main(["prepare", *common, "--patch-sizes", "32"]) == 0
    assert main(["classify", *common, *_options(CLASSIFY_OPTIONS)]) == 0
    segment_options = {"granularity": "el", "model": "linknet", "encoder": "resnet18", "pretrained": "none", "epochs": "1", "batch_size": "4", "device": "cpu", "num_workers": "0"}
    assert main(["segment", *common, *_options(segment_options)]) == 0

    client = MlflowClient(stack_tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    prepare_run = _only_run(client, experiment_id, "prepare")
    classify_run = _only_run(client, experiment_id, "classification")
    segment_run = _only_run(client, experiment_id, "segmentation")

    # Every artifact the server lists is an object in the bucket, and the bucket contains no other file of the run.
    for run in (prepare_run, classify_run, segment_run):
        assert run.info.status == "FINISHED", run.data.tags.get("task")
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        stored = _run_artifact_keys(bucket_keys, run)
        assert stored, f"no {run.data.tags['task']} artifacts in the bucket"
        assert stored == _listed_artifacts(client, run.info.run_id), run.data.tags["task"]

    assert "annotation_granularities.png" in _run_artifact_keys(bucket_keys, prepare_run)
    classify_keys = _run_artifact_keys(bucket_keys, classify_run)
    assert {"config.json", "class_map.json", "test_predictions.csv", "checkpoints/last.pt", "checkpoints/best.pt"} <= classify_keys
    segment_keys = _run_artifact_keys(bucket_keys, segment_run)
    assert "config.json" in segment_keys
    assert any(key.startswith("predictions/") and key.endswith(".png") for key in segment_keys)

    # The configuration in the bucket is the one the run was given.
    config_key = f"{experiment_id}/{classify_run.info.run_id}/artifacts/config.json"
    stored_config = json.loads(tracking_stack.s3_client().get_object(Bucket=tracking_stack.bucket, Key=config_key)["Body"].read())
    assert stored_config["granularity"] == "bd"
    assert stored_config["model"] == "mobilenet_v2"
    assert stored_config["patch_size"] == 32

    # MLflow 3 stores logged models beside the runs: <experiment id>/models/<model id>/artifacts/.
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert {model.source_run_id for model in models} == {classify_run.info.run_id, segment_run.info.run_id}
    for model in models:
        model_keys = bucket_keys(f"{experiment_id}/models/{model.model_id}/artifacts/")
        assert any(key.endswith("/MLmodel") for key in model_keys), model.source_run_id

    out = tmp_path / "compare"
    assert main(["compare", "--experiment", experiment, "--out", str(out)]) == 0

    table2 = pd.read_csv(out / "table2_classification.csv")
    f1_rows = table2[(table2["granularity"] == "bd") & (table2["metric"].str.contains("f1", case=False))]
    assert len(f1_rows) == 1, table2.to_string()
    assert f1_rows["n"].iloc[0] == 1
    assert f1_rows["mean"].iloc[0] == pytest.approx(100 * classify_run.data.metrics["test_f1"], abs=0.01)

    table4 = pd.read_csv(out / "table4_segmentation.csv")
    dice_rows = table4[(table4["granularity"] == "el") & (table4["metric"].str.contains("dice", case=False))]
    assert len(dice_rows) >= 1, table4.to_string()
    assert set(dice_rows["n"]) == {1}

    compare_run = _only_run(client, experiment_id, "compare")
    assert "table2_classification.md" in _run_artifact_keys(bucket_keys, compare_run)


def test_mlflow_run_classify_against_server(tracking_stack, stack_tracking_uri, tiny_consep, bucket_keys, tmp_path):
    dataset, class_map = tiny_consep
    experiment = "stack-mlflow-run"
    environment = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": stack_tracking_uri,
        "GRANULARITY_CACHE": str(tmp_path / "cache"),
    }
    parameters = {"dataset": str(dataset), "format": "consep", "class_map": str(class_map), **CLASSIFY_OPTIONS, "experiment": experiment}
    command = [str(VENV_BIN / "mlflow"), "run", str(PROJECT_ROOT), "-e", "classify", "--env-manager", "local", "--experiment-name", experiment]
    for key, value in parameters.items():
        command += ["-P", f"{key}={value}"]

    result = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(stack_tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    # The entry point logs into the run `mlflow run` created, not into a second one.
    assert len(runs) == 1
    [run] = runs
    try:
        assert run.info.status == "FINISHED"
        assert run.data.tags["task"] == "classification"
        assert run.data.tags["mlflow.project.entryPoint"] == "classify"
        assert run.data.params["granularity"] == "bd"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [metric.step for metric in history] == [1]
        keys = _run_artifact_keys(bucket_keys, run)
        assert {"config.json", "test_predictions.csv", "checkpoints/last.pt"} <= keys
    finally:
        # `mlflow run` runs the command in the project folder, so the run's checkpoints land in its checkpoints/.
        shutil.rmtree(PROJECT_ROOT / "checkpoints" / run.info.run_id, ignore_errors=True)
