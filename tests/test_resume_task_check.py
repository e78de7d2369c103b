"""Resuming a run of the other task names the right command."""

from __future__ import annotations

import mlflow
import pytest

from granularity.errors import UserError
from granularity.tracking.run import load_run_config


def test_segment_run_rejected_by_classify(tracking_uri):
    with mlflow.start_run() as run:
        mlflow.set_tag("task", "segmentation")
        mlflow.log_dict({"model": "unet"}, "config.json")

    with pytest.raises(UserError, match="granularity segment --resume"):
        load_run_config(run.info.run_id, task="classification")


def test_prepare_run_rejected_by_segment(tracking_uri):
    with mlflow.start_run() as run:
        mlflow.set_tag("task", "prepare")

    with pytest.raises(UserError, match="is a prepare run, not a segmentation run"):
        load_run_config(run.info.run_id, task="segmentation")


def test_matching_task_returns_config(tracking_uri):
    with mlflow.start_run() as run:
        mlflow.set_tag("task", "classification")
        mlflow.log_dict({"model": "resnet18"}, "config.json")

    assert load_run_config(run.info.run_id, task="classification") == {"model": "resnet18"}
