"""Fixtures for tests against real servers: one tracking stack (PostgreSQL, S3, MLflow) per test session.

``tracking_stack`` starts the stack once and yields the
``granularity.tracking.stack.TrackingStack``: ``tracking_uri``,
``s3_endpoint``, ``bucket``, ``s3_client()``, ``postgres_uri`` and
``stop_mlflow()`` / ``start_mlflow()`` / ``restart_mlflow()`` and the same
for PostgreSQL, for fault tests. ``stack_tracking_uri`` is the per-test
entry: it restarts whatever an earlier test left stopped, points
``MLFLOW_TRACKING_URI`` at the stack and runs the test in its own folder.
``tiny_consep`` writes a small two-class dataset for training runs, and
``bucket_keys`` lists the bucket with boto3.
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


TINY_CLASS_MAP = """
name: tiny
classes:
  - {name: pale, color: "#ffffff", severity: 0, tumour: false}
  - {name: dark, color: "#ff0000", severity: 1, tumour: true}
labels:
  1: pale
  2: dark
"""
TINY_REGIONS = 12
TINY_SIDE = 64


@pytest.fixture(scope="session")
def tiny_consep(tmp_path_factory):
    """Write a CoNSeP-layout dataset of 12 regions of 64 x 64 px and its class map; return (dataset, class map).

    Each region has a 4 x 4 grid of round nuclei: pale ones (raw class 1) in
    the top half and dark ones (raw class 2) in the bottom half, swapped in
    odd regions. Every region then has both classes for the test metrics,
    and 32 px windows at the top and bottom edges contain one class only.
    """
    import cv2
    import numpy as np
    import scipy.io

    root = tmp_path_factory.mktemp("tiny-consep")
    dataset = root / "tiny"
    (dataset / "Images").mkdir(parents=True)
    (dataset / "Labels").mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(TINY_REGIONS):
        image = np.full((TINY_SIDE, TINY_SIDE, 3), (230, 180, 200), dtype=np.uint8)
        instances = np.zeros((TINY_SIDE, TINY_SIDE), dtype=np.int32)
        raw_classes = []
        for cy in range(8, TINY_SIDE, 16):
            for cx in range(8, TINY_SIDE, 16):
                raw_classes.append(1 + (int(cy > TINY_SIDE // 2) + index) % 2)
                cv2.circle(instances, (cx, cy), 4, len(raw_classes), thickness=-1)
                image[instances == len(raw_classes)] = (150, 90, 160) if raw_classes[-1] == 1 else (40, 20, 90)
        noise = generator.integers(-10, 10, size=image.shape)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)

        name = f"tile{index}_000"
        cv2.imwrite(str(dataset / "Images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        inst_type = np.array(raw_classes, dtype=np.int32).reshape(-1, 1)
        scipy.io.savemat(dataset / "Labels" / f"{name}.mat", {"inst_map": instances, "inst_type": inst_type})

    class_map = root / "tiny.yaml"
    class_map.write_text(TINY_CLASS_MAP)
    return dataset, class_map


@pytest.fixture
def bucket_keys(tracking_stack):
    """Return a function that lists every object key in the stack's bucket under a prefix, read with boto3."""

    def list_keys(prefix: str = "") -> list[str]:
        keys = []
        paginator = tracking_stack.s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=tracking_stack.bucket, Prefix=prefix):
            keys += [entry["Key"] for entry in page.get("Contents", [])]
        return keys

    return list_keys
