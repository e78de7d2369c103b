"""The native tracking stack against real servers: storage places, loopback binding, restarts, basic auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
import sqlalchemy
from mlflow.exceptions import MlflowException

pytestmark = pytest.mark.integration

CLIENT_SCRIPT = """
import sys
import mlflow

mlflow.set_experiment("only-tracking-uri")
with mlflow.start_run() as run:
    mlflow.log_param("patch_size", 64)
    mlflow.log_text("granularity,dice\\npw,0.81\\n", "tables/dice.csv")
print(run.info.run_id)
"""


def _http_status(url: str) -> int | None:
    """Return the HTTP status of a GET, or None when no server responds."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def _bucket_keys(stack, prefix: str = "") -> list[str]:
    listing = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=prefix)
    return [entry["Key"] for entry in listing.get("Contents", [])]


def _listening_addresses(pid: int) -> set[str]:
    process = psutil.Process(pid)
    addresses = set()
    for member in [process, *process.children(recursive=True)]:
        for connection in member.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                addresses.add(connection.laddr.ip)
    return addresses


def test_services_listen_on_loopback_only(tracking_stack, stack_tracking_uri):
    for server in (tracking_stack.postgres, tracking_stack.s3, tracking_stack.mlflow):
        addresses = _listening_addresses(server.pid)
        assert addresses, f"{server.name} listens on no TCP socket"
        assert addresses == {"127.0.0.1"}, f"{server.name} listens on {addresses}"


def test_run_data_stored_in_postgres(tracking_stack, stack_tracking_uri):
    client = mlflow.MlflowClient(stack_tracking_uri)
    experiment_id = client.create_experiment("stack-postgres")
    run = client.create_run(experiment_id)
    for epoch, loss in enumerate([0.9, 0.5, 0.25]):
        client.log_metric(run.info.run_id, "train_loss", loss, step=epoch)
    client.set_terminated(run.info.run_id)

    connection = tracking_stack.postgres.connect(tracking_stack.postgres.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            rows = cursor.fetchall()
            cursor.execute(
                "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train_loss' ORDER BY step",
                (run.info.run_id,),
            )
            metrics = cursor.fetchall()
    finally:
        connection.close()

    assert rows == [("FINISHED",)]
    assert metrics == [(0, 0.9), (1, 0.5), (2, 0.25)]


def test_client_with_only_tracking_uri_logs_artifacts(tracking_stack, stack_tracking_uri, tmp_path):
    # The client gets no S3 endpoint and no AWS keys: the server's artifact proxy must do the upload.
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": stack_tracking_uri,
    }
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = result.stdout.strip().splitlines()[-1]

    run = mlflow.MlflowClient(stack_tracking_uri).get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert run.data.params == {"patch_size": "64"}

    keys = [key for key in _bucket_keys(tracking_stack) if f"/{run_id}/" in key]
    assert len(keys) == 1
    assert keys[0].endswith(f"{run_id}/artifacts/tables/dice.csv")
    stored = tracking_stack.s3_client().get_object(Bucket=tracking_stack.bucket, Key=keys[0])["Body"].read()
    assert stored == b"granularity,dice\npw,0.81\n"


def test_mlflow_restart_keeps_runs_and_artifacts(tracking_stack, stack_tracking_uri):
    with mlflow.start_run() as run:
        mlflow.log_dict({"granularity": "el"}, "config.json")

    tracking_stack.stop_mlflow()
    assert _http_status(stack_tracking_uri + "/health") is None

    tracking_stack.start_mlflow()
    assert _http_status(stack_tracking_uri + "/health") == 200
    client = mlflow.MlflowClient(stack_tracking_uri)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    local_path = client.download_artifacts(run.info.run_id, "config.json")
    with open(local_path) as stored:
        assert json.load(stored) == {"granularity": "el"}


def test_postgres_restart_keeps_server_usable(tracking_stack, stack_tracking_uri):
    client = mlflow.MlflowClient(stack_tracking_uri)
    run = client.create_run("0")
    client.log_metric(run.info.run_id, "dice", 0.5, step=0)

    tracking_stack.restart_postgres()

    client.log_metric(run.info.run_id, "dice", 0.75, step=1)
    history = client.get_metric_history(run.info.run_id, "dice")
    assert [(metric.step, metric.value) for metric in history] == [(0, 0.5), (1, 0.75)]


def test_stopped_postgres_fails_requests(tracking_stack, stack_tracking_uri):
    tracking_stack.stop_postgres()
    try:
        response = requests.get(stack_tracking_uri + "/api/2.0/mlflow/experiments/get", params={"experiment_id": "0"}, timeout=30)
        assert response.status_code >= 500
    finally:
        tracking_stack.start_postgres()

    response = requests.get(stack_tracking_uri + "/api/2.0/mlflow/experiments/get", params={"experiment_id": "0"}, timeout=30)
    assert response.status_code == 200


def test_basic_auth_rejects_client_without_credentials(basic_auth_server, stack_tracking_uri, monkeypatch):
    search = basic_auth_server.tracking_uri + "/api/2.0/mlflow/experiments/search"
    admin = basic_auth_server.basic_auth

    assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=(admin.username, "wrong"), timeout=30).status_code == 401
    # Health stays open so that load balancers and the CLI's reachability check work without credentials.
    assert _http_status(basic_auth_server.tracking_uri + "/health") == 200

    monkeypatch.setenv("MLFLOW_TRACKING_URI", basic_auth_server.tracking_uri)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        mlflow.MlflowClient(basic_auth_server.tracking_uri).create_experiment("no-credentials")


def test_basic_auth_accepts_client_with_credentials(basic_auth_server, tracking_stack, stack_tracking_uri, monkeypatch):
    admin = basic_auth_server.basic_auth
    monkeypatch.setenv("MLFLOW_TRACKING_URI", basic_auth_server.tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin.password)

    client = mlflow.MlflowClient(basic_auth_server.tracking_uri)
    experiment_id = client.create_experiment("with-credentials")
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, "authorised", "note.txt")
    client.set_terminated(run.info.run_id)

    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    keys = [key for key in _bucket_keys(tracking_stack) if key.endswith(f"{run.info.run_id}/artifacts/note.txt")]
    assert len(keys) == 1



def test_compose_bucket_script_is_idempotent(tracking_stack, tmp_path):
    script = Path(__file__).resolve().parents[2] / "docker" / "create_bucket.py"
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MLFLOW_S3_ENDPOINT_URL": tracking_stack.s3_endpoint,
        "MLFLOW_BUCKET": "compose-artifacts",
        **tracking_stack.s3_credentials,
    }

    first = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True, text=True, timeout=60, check=False)
    second = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True, text=True, timeout=60, check=False)

    assert first.returncode == 0, first.stderr
    assert "created bucket compose-artifacts" in first.stderr
    assert second.returncode == 0, second.stderr
    assert "bucket compose-artifacts exists" in second.stderr
    buckets = [bucket["Name"] for bucket in tracking_stack.s3_client().list_buckets()["Buckets"]]
    assert "compose-artifacts" in buckets


def test_create_database_returns_usable_uri(tracking_stack):
    uri = tracking_stack.create_database("optuna_storage")
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "optuna_storage"
    finally:
        engine.dispose()

    assert tracking_stack.create_database("optuna_storage") == uri
