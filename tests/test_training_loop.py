"""The shared training loop and the MLflow run context, with a tiny model on random tensors."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from granularity.errors import UserError
from granularity.tracking.run import tracked_run
from granularity.training.checkpoint import load_checkpoint, save_checkpoint
from granularity.training.device import resolve_device
from granularity.training.loop import FitOptions, TrainingDivergedError, fit


def _loaders(seed: int = 0):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (48,), generator=generator)
    shuffle = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True, generator=shuffle)
    val = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    return train, val


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3))


def _step(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _evaluate(model, batches):
    loss, correct, count = 0.0, 0, 0
    for images, labels in batches:
        logits = model(images)
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return {"val_loss": loss / count, "val_f1": correct / count}


class _Recorder:
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step=0):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, local_path, artifact_path=None):
        self.artifacts.append(f"{artifact_path}/{local_path.name}")


def test_fit_resume_matches_uninterrupted(tmp_path):
    train, val = _loaders()
    model = _model()
    full = fit(model, torch.optim.Adam(model.parameters(), 0.01), train, val, _step, _evaluate, FitOptions(epochs=3, checkpoint_dir=tmp_path / "full", progress=False))

    train, val = _loaders()
    model = _model()
    fit(model, torch.optim.Adam(model.parameters(), 0.01), train, val, _step, _evaluate, FitOptions(epochs=1, checkpoint_dir=tmp_path / "part", progress=False))
    train, val = _loaders(seed=99)
    model = _model()
    recorder = _Recorder()
    resumed = fit(
        model,
        torch.optim.Adam(model.parameters(), 0.01),
        train,
        val,
        _step,
        _evaluate,
        FitOptions(epochs=3, checkpoint_dir=tmp_path / "part", progress=False),
        tracker=recorder,
        resume_from=tmp_path / "part" / "last.pt",
    )

    assert [step for step, _ in recorder.metrics] == [2, 3]
    assert resumed.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], abs=1e-7)
    assert resumed.best_metric == full.best_metric
    assert "checkpoints/last.pt" in recorder.artifacts
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 3


def test_fit_nan_loss_raises(tmp_path):
    train, val = _loaders()
    model = _model()

    with pytest.raises(TrainingDivergedError, match="loss became nan in epoch 1"):
        fit(model, torch.optim.SGD(model.parameters(), 0.1), train, val, lambda m, b: _step(m, b) * float("nan"), _evaluate, FitOptions(epochs=2, checkpoint_dir=tmp_path, progress=False))


def test_fit_early_stopping(tmp_path):
    train, val = _loaders()
    model = _model()
    constant = lambda model, batches: {"val_loss": 1.0, "val_f1": 0.5}

    result = fit(model, torch.optim.SGD(model.parameters(), 0.1), train, val, _step, constant, FitOptions(epochs=10, checkpoint_dir=tmp_path, early_stopping=2, progress=False))

    assert result.stopped_early
    assert result.last_epoch == 3
    assert result.best_epoch == 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {}, "epoch": 1})

    def failing_save(state, stream):
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {}, "epoch": 2})
    monkeypatch.undo()

    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resolve_device_cuda_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="--device cpu"):
        resolve_device("cuda")


def test_tracked_run_statuses_and_resume(tracking_uri):
    config = {"lr": 0.1, "epochs": 2}
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(task="demo", config=config, log_system_metrics=False) as run:
            run.log_metrics({"loss": 1.0}, step=1)
            raise KeyboardInterrupt
    client = MlflowClient()
    assert client.get_run(run.run_id).info.status == "KILLED"

    with tracked_run(task="demo", config=config, resume_run_id=run.run_id, log_system_metrics=False) as resumed:
        assert resumed.resumed
        assert resumed.log_metrics({"loss": 2.0}, step=1) == {}
        assert resumed.log_metrics({"loss": 0.5}, step=2) == {"loss": 0.5}

    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert finished.data.params == {"lr": "0.1", "epochs": "2"}
    assert finished.data.tags["task"] == "demo"
    assert "failure_reason" not in finished.data.tags

    with pytest.raises(UserError, match="finished already"):
        with tracked_run(task="demo", config=config, resume_run_id=run.run_id, log_system_metrics=False):
            pass


def test_tracked_run_failure_reason(tracking_uri):
    with pytest.raises(ValueError):
        with tracked_run(task="demo", config={}, log_system_metrics=False) as run:
            raise ValueError("broken input")

    failed = MlflowClient().get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"] == "ValueError: broken input"


def test_tracked_run_nested_under_parent(tracking_uri):
    with tracked_run(task="study", config={}, log_system_metrics=False) as parent:
        with tracked_run(task="demo", config={}, parent_run_id=parent.run_id, log_system_metrics=False) as child:
            pass

    assert MlflowClient().get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert mlflow.active_run() is None


def test_tracked_run_adopts_mlflow_project_run(tracking_uri, monkeypatch):
    mlflow.set_tracking_uri(tracking_uri)
    other = mlflow.create_experiment("project-experiment")
    project_run = MlflowClient().create_run(other)
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)

    with tracked_run(task="demo", config={"lr": 0.1}, log_system_metrics=False) as run:
        pass

    assert run.run_id == project_run.info.run_id
    adopted = MlflowClient().get_run(run.run_id)
    assert adopted.info.status == "FINISHED"
    assert adopted.data.params == {"lr": "0.1"}
