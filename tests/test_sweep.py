"""Search-space files, the sweep objective with a fake trainer, and one real tiny classification sweep, in SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from granularity.cli import main
from granularity.errors import ConfigError, UserError
from granularity.sweep.runner import run_sweep
from granularity.sweep.space import load_space, parse_space
from granularity.sweep.storage import redact_url, storage_scheme
from granularity.tracking.run import tracked_run

from conftest import PROJECT_ROOT
from test_classify import CLASS_MAP, _write_dataset

EXPERIMENT = "sweep-test"


def _space(parameters: dict, task: str = "classify") -> dict:
    return {"task": task, "parameters": parameters}


def test_shipped_spaces_load():
    classify = load_space(PROJECT_ROOT / "mlproject" / "sweeps" / "classify.yaml", "classify")
    segment = load_space(PROJECT_ROOT / "mlproject" / "sweeps" / "segment.yaml", "segment")

    assert "lr" in classify.names
    assert classify.parameters[classify.names.index("lr")].log is True
    assert "loss" in segment.names


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"lrr": {"type": "float", "low": 0.1, "high": 1.0}}, "unknown parameters ['lrr']"),
        ({"seed": {"type": "int", "low": 0, "high": 3}}, "unknown parameters ['seed']"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "low 0.1 must be less than high 0.01"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.1}}, "low 0.1 must be less than high 0.1"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
        ({"lr": {"type": "floaat", "low": 0.1, "high": 1.0}}, "unknown type 'floaat'"),
        ({"lr": {"type": "float", "low": 0.1, "hi": 1.0}}, "unknown keys ['hi']"),
        ({"lr": {"type": "float", "low": "1e-5", "high": 0.1}}, "low '1e-5' is invalid"),
        ({"epochs": {"type": "int", "low": 1.5, "high": 4}}, "low 1.5 is invalid for type int"),
        ({"lr": {"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}}, "step and log: true cannot be combined"),
        ({"batch_size": {"type": "categorical", "choices": []}}, "choices [] is invalid"),
        ({"batch_size": {"type": "categorical", "choices": [32, 32]}}, "repeat a value"),
    ],
)
def test_space_rejects_invalid_parameter(parameters, message):
    with pytest.raises(ConfigError) as error:
        parse_space(_space(parameters), "classify", "space.yaml")

    assert "space.yaml" in str(error.value)
    assert message in str(error.value)


def test_space_rejects_other_task():
    with pytest.raises(ConfigError, match="the space is for task segment"):
        parse_space(_space({"lr": {"type": "float", "low": 0.001, "high": 0.1}}, task="segment"), "classify", "space.yaml")


def test_space_segment_option_not_in_classify():
    with pytest.raises(ConfigError, match=r"unknown parameters \['tile_size'\]"):
        parse_space(_space({"tile_size": {"type": "categorical", "choices": [64, 128]}}), "classify", "space.yaml")


def test_space_suggests_fixed_trial_values():
    space = parse_space(
        _space({
            "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
            "epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        }),
        "classify",
    )

    values = space.suggest(optuna.trial.FixedTrial({"lr": 0.003, "epochs": 4, "optimizer": "sgd"}))

    assert values == {"lr": 0.003, "epochs": 4, "optimizer": "sgd"}


def test_storage_url_checks():
    assert storage_scheme("sqlite:///optuna.db") == "sqlite"
    assert storage_scheme("postgresql+psycopg2://user:secret@127.0.0.1:5432/optuna") == "postgresql"
    assert "secret" not in redact_url("postgresql+psycopg2://user:secret@127.0.0.1:5432/optuna")
    with pytest.raises(ConfigError, match="'redis://127.0.0.1' is not supported"):
        storage_scheme("redis://127.0.0.1")


@pytest.fixture
def sweep_files(tmp_path, tracking_uri):
    dataset = tmp_path / "synthetic"
    _write_dataset(dataset)
    class_map = tmp_path / "synthetic.yaml"
    class_map.write_text(CLASS_MAP)
    return dataset, class_map


def test_cli_invalid_space_exits_2(sweep_files, tmp_path, capsys):
    dataset, class_map = sweep_files
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  learning_rate: {type: float, low: 0.001, high: 0.1}\n")

    code = main(["sweep", "--task", "classify", "--n-trials", "1", "--space", str(space), "--dataset", str(dataset), "--class-map", str(class_map)])

    assert code == 2
    assert "unknown parameters ['learning_rate']" in capsys.readouterr().err


def test_cli_invalid_choice_exits_before_trials(sweep_files, tmp_path, capsys):
    dataset, class_map = sweep_files
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  model: {type: categorical, choices: [resnet18, resnet999]}\n")

    code = main(["sweep", "--task", "classify", "--n-trials", "1", "--space", str(space), "--dataset", str(dataset), "--class-map", str(class_map)])

    assert code == 2
    assert "parameter model value 'resnet999' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()


def _fake_trainer(config, parent_run_id=None, epoch_callback=None):
    """Train nothing: report val_f1 0.9 per epoch for adam and 0.1 for sgd, inside the project's run context."""
    score = 0.9 if config["optimizer"] == "adam" else 0.1
    with tracked_run(task="classification", config=config, experiment=config["experiment"], parent_run_id=parent_run_id, log_system_metrics=False) as run:
        for epoch in (1, 2):
            metrics = {"val_loss": 1.0 - score, "val_f1": score}
            run.log_metrics(metrics, step=epoch)
            epoch_callback(epoch, metrics)
        return run.run_id


def test_sweep_prunes_and_records_best(sweep_files, tmp_path):
    dataset, class_map = sweep_files
    space = parse_space(_space({"optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}}), "classify")
    config = {"dataset": str(dataset), "class_map": str(class_map), "epochs": 2}

    result = run_sweep(
        "classify",
        config,
        2,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="prune-test",
        space=space,
        pruner=optuna.pruners.ThresholdPruner(lower=0.5),
        experiment=EXPERIMENT,
        task_function=_fake_trainer,
        sampler=optuna.samplers.GridSampler({"optimizer": ["adam", "sgd"]}),
    )

    client = MlflowClient()
    children = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    by_optimizer = {run.data.params["optimizer"]: run for run in children}
    assert sorted(by_optimizer) == ["adam", "sgd"]
    assert by_optimizer["adam"].info.status == "FINISHED"
    assert by_optimizer["sgd"].info.status == "KILLED"
    assert by_optimizer["sgd"].data.tags["pruned"] == "true"
    assert by_optimizer["sgd"].data.tags["pruned_epoch"] == "1"
    assert "failure_reason" not in by_optimizer["sgd"].data.tags
    assert client.get_metric_history(by_optimizer["sgd"].info.run_id, "val_f1")[-1].step == 1

    assert (result.complete, result.pruned, result.failed) == (1, 1, 0)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["task"] == "sweep"
    assert parent.data.tags["best_run_id"] == by_optimizer["adam"].info.run_id
    assert parent.data.tags["best_param.optimizer"] == "adam"
    assert parent.data.metrics["best_val_f1"] == pytest.approx(0.9)


def test_sweep_rerun_continues_study(sweep_files, tmp_path):
    dataset, class_map = sweep_files
    space = parse_space(_space({"lr": {"type": "float", "low": 0.0001, "high": 0.01, "log": True}}), "classify")
    config = {"dataset": str(dataset), "class_map": str(class_map), "optimizer": "adam"}
    arguments = dict(storage=f"sqlite:///{tmp_path / 'optuna.db'}", space=space, pruner="none", experiment=EXPERIMENT, task_function=_fake_trainer)

    first = run_sweep("classify", config, 2, **arguments)
    second = run_sweep("classify", config, 3, **arguments)

    assert second.study_name == first.study_name
    assert second.parent_run_id == first.parent_run_id
    assert second.complete == 3
    client = MlflowClient()
    children = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")
    assert len(children) == 3


def test_sweep_all_trials_failing_raises(sweep_files, tmp_path):
    dataset, class_map = sweep_files
    space = parse_space(_space({"lr": {"type": "float", "low": 0.0001, "high": 0.01}}), "classify")

    def broken(config, parent_run_id=None, epoch_callback=None):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(UserError, match="CUDA out of memory"):
        run_sweep(
            "classify", {"dataset": str(dataset), "class_map": str(class_map)}, 2,
            storage=f"sqlite:///{tmp_path / 'optuna.db'}", space=space, experiment=EXPERIMENT, task_function=broken,
        )


def test_classify_sweep_two_real_trials(sweep_files, tmp_path, capsys):
    dataset, class_map = sweep_files
    space = tmp_path / "space.yaml"
    space.write_text("task: classify\nparameters:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    arguments = [
        "sweep", "--task", "classify", "--n-trials", "2", "--space", str(space), "--experiment", EXPERIMENT,
        "--dataset", str(dataset), "--format", "consep", "--class-map", str(class_map), "--granularity", "bd",
        "--patch-size", "32", "--model", "mobilenet_v2", "--pretrained", "none", "--epochs", "1", "--batch-size", "32",
        "--augment", "none", "--input-size", "32", "--device", "cpu", "--num-workers", "0",
        "--cache-dir", str(tmp_path / "cache"), "--lr", "0.5",
    ]

    assert main(arguments) == 0

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    [parent] = client.search_runs([experiment_id], "tags.task = 'sweep'")
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert 1.0e-4 <= float(child.data.params["lr"]) <= 1.0e-2
        assert "test_f1" in child.data.metrics
    scores = {run.info.run_id: client.get_metric_history(run.info.run_id, "val_f1")[-1].value for run in children}
    best_score = max(scores.values())
    assert parent.data.metrics["best_val_f1"] == pytest.approx(best_score)
    best_run_id = parent.data.tags["best_run_id"]
    assert scores[best_run_id] == pytest.approx(best_score)
    assert float(parent.data.tags["best_param.lr"]) == float(client.get_run(best_run_id).data.params["lr"])
    assert f"runs:/{best_run_id}/model" in capsys.readouterr().out
    assert Path(tmp_path / "optuna.db").is_file()


def test_sweep_nests_under_mlflow_run_id(sweep_files, tmp_path, monkeypatch):
    dataset, class_map = sweep_files
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    project_experiment = MlflowClient().create_experiment("project-entry-point")
    project_run = MlflowClient().create_run(project_experiment).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    space = parse_space(_space({"lr": {"type": "float", "low": 0.0001, "high": 0.01}}), "classify")

    result = run_sweep(
        "classify", {"dataset": str(dataset), "class_map": str(class_map), "optimizer": "adam"}, 2,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", space=space, pruner="none", experiment=EXPERIMENT, task_function=_fake_trainer,
    )

    client = MlflowClient()
    children = client.search_runs([project_experiment], f"tags.`mlflow.parentRunId` = '{project_run}'")
    assert result.parent_run_id == project_run
    assert len(children) == 2
    assert {run.info.status for run in children} == {"FINISHED"}
    assert client.get_run(project_run).info.status == "RUNNING"
    assert client.get_run(project_run).data.tags["best_run_id"] in {run.info.run_id for run in children}
    assert "MLFLOW_RUN_ID" not in os.environ
