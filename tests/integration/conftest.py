"""Fixtures for tests against real servers: one tracking stack (PostgreSQL, S3, MLflow) per test session.

``tracking_stack`` starts the stack once and yields the
``granularity.tracking.stack.TrackingStack``: ``tracking_uri``,
``s3_endpoint``, ``bucket``, ``s3_client()``, ``postgres_uri`` and
``stop_mlflow()`` / ``start_mlflow()`` / ``restart_mlflow()`` and the same
for PostgreSQL, for fault tests. ``stack_tracking_uri`` is the per-test
entry: it restarts whatever an earlier test left stopped, points
``MLFLOW_TRACKING_URI`` at the stack and runs the test in its own folder.
"""

from __future__ import annotations

import pytest

from granularity.tracking.stack import POSTGRES_BIN_ENV, BasicAuth, MlflowServer, TrackingStack, find_postgres_bin

# Client settings from the developer's shell would send the tests' runs elsewhere or add credentials.
CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)


def require_stack_tools() -> None:
    """Skip the calling test when PostgreSQL or moto's server is not installed."""
    if find_postgres_bin() is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, postgres) not found; install them "
            f"(Debian: apt-get install postgresql-15) or set {POSTGRES_BIN_ENV} to run the integration tests"
        )
    pytest.importorskip("moto.server", reason="moto's S3 server is not installed; run pip install 'moto[server]'")


@pytest.fixture
def stack_tools() -> None:
    """Skip the test unless PostgreSQL and moto's server are installed."""
    require_stack_tools()


@pytest.fixture(scope="session")
def tracking_stack():
    """Start PostgreSQL, an S3 endpoint and an MLflow server once for the session; stop them at its end."""
    require_stack_tools()
    stack = TrackingStack().start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def stack_tracking_uri(tracking_stack, tmp_path, monkeypatch) -> str:
    """Point MLflow clients at the running stack and run the test from a fresh folder."""
    tracking_stack.ensure_running()
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_stack.tracking_uri)
    monkeypatch.chdir(tmp_path)
    return tracking_stack.tracking_uri


@pytest.fixture(scope="session")
def basic_auth_server(tracking_stack) -> MlflowServer:
    """An MLflow server with the basic-auth app on the stack's database and bucket; its admin is ``.basic_auth``."""
    return tracking_stack.start_mlflow_server(basic_auth=BasicAuth())
