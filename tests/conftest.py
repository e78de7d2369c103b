"""Shared fixtures: the real datasets beside the project and an isolated MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("GRANULARITY_DATASETS", PROJECT_ROOT.parent / "shared" / "datasets"))
CONSEP = DATASETS / "consep-256"
PANNUKE = DATASETS / "pannuke-breast-demo"
CLASS_MAPS = PROJECT_ROOT / "mlproject" / "class_maps"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real dataset {path} is absent; place the datasets under {DATASETS} to run this test")
    return path


@pytest.fixture
def consep_root() -> Path:
    return _require(CONSEP)


@pytest.fixture
def pannuke_root() -> Path:
    return _require(PANNUKE)


def reset_fluent_uri() -> None:
    """Make MLflow's fluent API and ``MlflowClient()`` follow ``MLFLOW_TRACKING_URI`` again.

    ``mlflow.set_tracking_uri`` keeps its URI in a module global that outlives
    a test, and ``set_tracking_uri(None)`` also deletes the variable, so the
    variable's value is put back afterwards.
    """
    import mlflow
    import mlflow.tracking.fluent

    value = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    if value is not None:
        os.environ["MLFLOW_TRACKING_URI"] = value

    # set_experiment also keeps the experiment id in a global and in MLFLOW_EXPERIMENT_ID, which name an
    # experiment of an earlier test's store.
    mlflow.tracking.fluent._active_experiment_id = None
    for variable in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        os.environ.pop(variable, None)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """Point MLflow at a fresh SQLite store in the test's folder and run the test from there."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    reset_fluent_uri()
    yield uri
    reset_fluent_uri()
