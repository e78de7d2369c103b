"""Faults of the tracking stack during work: the MLflow server stopped mid-training, PostgreSQL restarted mid-study.

The CLI runs in a subprocess through a small wrapper that pauses the run
before it logs a chosen epoch, so the test injects the fault at a known
point instead of racing the training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from granularity.cli import main
from granularity.tracking.retry import (
    HTTP_RETRY_DEFAULTS,
    apply_http_retry_defaults,
    failure_summary,
    is_server_failure,
    single_attempt,
)

pytestmark = pytest.mark.integration

RETRY_VARIABLES = tuple(HTTP_RETRY_DEFAULTS)
GATE_TIMEOUT_S = 300

# Runs the granularity CLI, but the run that is the FAULT_PAUSE_RUN-th to log training metrics for epoch
# FAULT_PAUSE_STEP first writes <gate>/paused (containing its run id) and waits for <gate>/released.
# The checkpoint of that epoch is on disk by then, because the training loop writes it before logging.
GATED_CLI = """
import os, sys, time
from pathlib import Path

from granularity.cli import main
from granularity.tracking import run as tracking_run

gate = Path(os.environ["FAULT_GATE"])
pause_step = int(os.environ["FAULT_PAUSE_STEP"])
pause_run = int(os.environ["FAULT_PAUSE_RUN"])
timeout_s = float(os.environ["FAULT_GATE_TIMEOUT_S"])
runs_at_step = []
log_metrics = tracking_run.TrackedRun.log_metrics

def gated_log_metrics(self, metrics, step=0):
    if "train_loss" in metrics and step == pause_step and self.run_id not in runs_at_step:
        runs_at_step.append(self.run_id)
        if len(runs_at_step) == pause_run:
            (gate / "paused").write_text(self.run_id)
            deadline = time.monotonic() + timeout_s
            while not (gate / "released").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    return log_metrics(self, metrics, step)

tracking_run.TrackedRun.log_metrics = gated_log_metrics
sys.exit(main(sys.argv[1:]))
"""


def _client_environment(stack_tracking_uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": stack_tracking_uri,
        "GRANULARITY_CACHE": str(tmp_path / "cache"),
        **extra,
    }


def _start_gated(arguments: list[str], environment: dict[str, str], gate: Path, pause_step: int, pause_run: int, log_path: Path) -> subprocess.Popen:
    gate.mkdir()
    environment = {
        **environment,
        "FAULT_GATE": str(gate),
        "FAULT_PAUSE_STEP": str(pause_step),
        "FAULT_PAUSE_RUN": str(pause_run),
        "FAULT_GATE_TIMEOUT_S": str(GATE_TIMEOUT_S),
    }
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", GATED_CLI, *arguments], env=environment, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_pause(process: subprocess.Popen, gate: Path, log_path: Path) -> str:
    """Return the id of the paused run once the wrapper has paused; fail when the process exits first."""
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not (gate / "paused").exists():
        if process.poll() is not None:
            pytest.fail(f"the CLI exited with {process.returncode} before the pause:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the CLI did not reach the pause:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return (gate / "paused").read_text()


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


@pytest.fixture
def retry_environment(monkeypatch):
    """Remove the HTTP retry variables for the test and restore them afterwards, whatever configure_mlflow sets."""
    for name in RETRY_VARIABLES:
        # setenv records the original state, unset included, so the teardown also removes values set later.
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


def test_retry_defaults_fill_unset_variables(retry_environment, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

    effective = apply_http_retry_defaults()

    assert effective == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    }
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4"


def test_single_attempt_restores_variables(retry_environment, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")

    with single_attempt():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_server_failure_distinguished_from_rejection(retry_environment, monkeypatch):
    # Port 9 (discard) has no listener on the loopback, so the connection is refused.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as refused:
        MlflowClient("http://127.0.0.1:9").get_experiment("0")

    assert is_server_failure(refused.value)
    assert failure_summary(refused.value) == "[Errno 111] Connection refused"
    rejected = MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 404 != 200. Response body: ''")
    assert not is_server_failure(rejected)
    assert not is_server_failure(ValueError("training loss became nan"))


def test_server_stop_during_training_then_resume(tracking_stack, stack_tracking_uri, tiny_consep, tmp_path, retry_environment, monkeypatch):
    dataset, class_map = tiny_consep
    experiment = "fault-server-stop"
    epochs = 3
    arguments = [
        "classify", "--dataset", str(dataset), "--format", "consep", "--class-map", str(class_map),
        "--granularity", "pw", "--patch-size", "32", "--model", "mobilenet_v2", "--pretrained", "none",
        "--epochs", str(epochs), "--batch-size", "32", "--augment", "none", "--input-size", "16",
        "--device", "cpu", "--num-workers", "0", "--experiment", experiment,
    ]
    # Two retries with factor 1 (sleeps of 0 and 2 s) keep the test short; the project defaults wait about 30 s.
    environment = _client_environment(
        stack_tracking_uri, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"
    )
    log_path = tmp_path / "classify.log"
    process = _start_gated(arguments, environment, tmp_path / "gate", pause_step=2, pause_run=1, log_path=log_path)
    try:
        run_id = _wait_for_pause(process, tmp_path / "gate", log_path)
        tracking_stack.stop_mlflow()
        (tmp_path / "gate" / "released").touch()
        returncode = process.wait(timeout=GATE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()

    assert returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"error: tracking server {stack_tracking_uri} stopped responding during run {run_id}"), last_line
    assert f"--resume {run_id}" in last_line
    assert "Connection refused" in last_line
    # urllib3 logs each retry of MLflow's client; two per failed request with MAX_RETRIES=2.
    assert output.count("Retrying (") >= 2, output[-3000:]

    # Epoch 2 finished and was checkpointed before its metrics failed to reach the server.
    checkpoint_dir = tmp_path / "checkpoints" / run_id
    last = torch.load(checkpoint_dir / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2
    assert (checkpoint_dir / "best.pt").is_file()

    tracking_stack.start_mlflow()
    client = MlflowClient(stack_tracking_uri)
    # The server was down when the client gave up, so the run could not be marked KILLED.
    assert client.get_run(run_id).info.status == "RUNNING"
    assert _steps(client, run_id, "train_loss") == [1]

    monkeypatch.setenv("GRANULARITY_CACHE", str(tmp_path / "cache"))
    assert main(["classify", "--resume", run_id, "--device", "cpu", "--num-workers", "0"]) == 0

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags
    for key in ("train_loss", "val_loss", "val_f1"):
        assert _steps(client, run_id, key) == list(range(1, epochs + 1)), key
    # The epoch the server missed is logged from the checkpoint, with the values computed before the stop.
    [epoch_2_loss] = [metric.value for metric in client.get_metric_history(run_id, "train_loss") if metric.step == 2]
    assert epoch_2_loss == pytest.approx(last["metrics"]["train_loss"], rel=1e-6)
    assert "test_f1" in run.data.metrics


def test_postgres_restart_during_study(tracking_stack, stack_tracking_uri, tiny_consep, tmp_path, retry_environment):
    dataset, class_map = tiny_consep
    experiment = "fault-postgres-restart"
    epochs = 1
    preset = tmp_path / "tiny-study.yaml"
    preset.write_text(
        f"""
name: tiny-fault
description: three tiny classification runs for the PostgreSQL restart test
dataset:
  path: {dataset}
  format: consep
  class_map: {class_map}
classification:
  seeds: 1
  grid:
    model: [mobilenet_v2]
    granularity: [pw, el, bd]
    patch_size: [32]
  params:
    pretrained: none
    epochs: {epochs}
    batch_size: 32
    augment: none
    input_size: 16
    device: cpu
    num_workers: 0
"""
    )
    arguments = ["study", "--preset", str(preset), "--experiment", experiment]
    # The project's retry defaults apply: their backoff must outlast the restart.
    environment = _client_environment(stack_tracking_uri, tmp_path)

    log_path = tmp_path / "study.log"
    process = _start_gated(arguments, environment, tmp_path / "gate", pause_step=1, pause_run=2, log_path=log_path)
    try:
        _wait_for_pause(process, tmp_path / "gate", log_path)
        server_log_start = tracking_stack.mlflow.log_path.stat().st_size
        # The second configuration's first metrics go to the server while PostgreSQL is down.
        tracking_stack.stop_postgres()
        (tmp_path / "gate" / "released").touch()
        time.sleep(1)
        tracking_stack.start_postgres()
        returncode = process.wait(timeout=GATE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        tracking_stack.ensure_running()
    output = log_path.read_text()

    attempts = [(returncode, output)]
    if returncode != 0:
        # A study that stopped continues when run again.
        again = subprocess.run(
            [sys.executable, "-m", "granularity", *arguments], env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=GATE_TIMEOUT_S, check=False
        )
        attempts.append((again.returncode, again.stdout + again.stderr))
    assert attempts[-1][0] == 0, attempts
    assert "Traceback" not in output, output[-3000:]
    # The fault reached a request: the server responded to the paused run's metrics with HTTP 503 at least once.
    with open(tracking_stack.mlflow.log_path, encoding="utf-8", errors="replace") as server_log:
        server_log.seek(server_log_start)
        assert '"POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 503' in server_log.read()

    client = MlflowClient(stack_tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs([experiment_id], "tags.task = 'study'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finished: dict[str, list[str]] = {}
    for child in children:
        if child.info.status == "FINISHED":
            # The runner tags study_config_key where the run's own config_key differs from the key it computed.
            key = child.data.tags.get("study_config_key") or child.data.tags["config_key"]
            finished.setdefault(key, []).append(child.info.run_id)

    assert len(finished) == 3, finished
    for key, run_ids in finished.items():
        assert len(run_ids) == 1, f"configuration {key} finished {len(run_ids)} times"
        assert _steps(client, run_ids[0], "train_loss") == list(range(1, epochs + 1)), key
    granularities = {client.get_run(run_ids[0]).data.tags["granularity"] for run_ids in finished.values()}
    assert granularities == {"pw", "el", "bd"}
