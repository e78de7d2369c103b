"""Sweeps with the Optuna storage on the stack's PostgreSQL and the trials tracked by its MLflow server."""

from __future__ import annotations

import threading
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from granularity.sweep.runner import run_sweep
from granularity.sweep.space import parse_space

SPACE = {"task": "classify", "parameters": {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True}}}


@pytest.fixture
def base_config(tmp_path) -> dict:
    dataset = tmp_path / "data"
    dataset.mkdir()
    return {"dataset": str(dataset), "class_map": str(tmp_path / "classes.yaml"), "epochs": 2}


def _children(client: MlflowClient, experiment: str, parent_run_id: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


class ConcurrentTrainer:
    """A fake trainer that scores a trial by how close its lr is to 0.01 and counts how many trials train at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def __call__(self, config, parent_run_id=None, epoch_callback=None):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            with mlflow.start_run(parent_run_id=parent_run_id) as run:
                mlflow.log_params({"lr": config["lr"], "epochs": config["epochs"]})
                score = 1.0 / (1.0 + abs(config["lr"] - 0.01) * 100)
                for epoch in range(1, config["epochs"] + 1):
                    time.sleep(0.5)
                    metrics = {"val_loss": 1.0 - score, "val_f1": score * epoch / config["epochs"]}
                    mlflow.log_metrics(metrics, step=epoch)
                    epoch_callback(epoch, metrics)
            return run.info.run_id
        finally:
            with self.lock:
                self.running -= 1


def test_sweep_two_jobs_nests_trials_records_best(tracking_stack, stack_tracking_uri, base_config):
    storage = tracking_stack.create_database("optuna_sweep_jobs")
    trainer = ConcurrentTrainer()

    result = run_sweep(
        "classify", base_config, 4,
        n_jobs=2, storage=storage, study_name="jobs", space=parse_space(SPACE, "classify"),
        pruner="none", experiment="sweep-jobs", task_function=trainer,
    )

    client = MlflowClient()
    children = _children(client, "sweep-jobs", result.parent_run_id)
    assert trainer.peak == 2
    assert len(children) == 4
    assert {run.info.status for run in children} == {"FINISHED"}
    assert sorted(run.data.tags["optuna_trial"] for run in children) == ["0", "1", "2", "3"]

    final_scores = {run.info.run_id: run.data.metrics["val_f1"] for run in children}
    best_run_id = max(final_scores, key=final_scores.get)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["task"] == "sweep"
    assert parent.data.tags["best_run_id"] == best_run_id
    assert float(parent.data.tags["best_param.lr"]) == pytest.approx(float(client.get_run(best_run_id).data.params["lr"]))
    assert parent.data.metrics["best_val_f1"] == pytest.approx(final_scores[best_run_id])
    assert (result.complete, result.pruned, result.failed) == (4, 0, 0)

    study = optuna.load_study(study_name="jobs", storage=storage)
    assert {trial.user_attrs["mlflow_run_id"] for trial in study.trials} == set(final_scores)


def test_sweep_trainer_logging_lr_not_duplicate(tracking_stack, stack_tracking_uri, base_config):
    storage = tracking_stack.create_database("optuna_sweep_lr")

    def trainer(config, parent_run_id=None, epoch_callback=None):
        # The trainer logs the learning rate in its own format, which differs from the trial's value as text.
        with mlflow.start_run(parent_run_id=parent_run_id) as run:
            mlflow.log_param("lr", f"{config['lr']:.3g}")
            mlflow.log_metric("val_f1", 0.5, step=1)
            epoch_callback(1, {"val_loss": 0.5, "val_f1": 0.5})
        return run.info.run_id

    result = run_sweep(
        "classify", base_config, 2,
        storage=storage, study_name="lr", space=parse_space(SPACE, "classify"),
        pruner="none", experiment="sweep-lr", task_function=trainer,
    )

    assert (result.complete, result.failed) == (2, 0)
    client = MlflowClient()
    study = optuna.load_study(study_name="lr", storage=storage)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.params["lr"] == f"{trial.params['lr']:.3g}"
        assert run.data.params["lr"] != str(trial.params["lr"])
        assert run.info.status == "FINISHED"
