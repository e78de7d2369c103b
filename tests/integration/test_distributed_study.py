"""Worker processes sharing one study through an Optuna storage on PostgreSQL, tracked by the stack's MLflow server.

The workers are this file run as a script: they call ``run_distributed_study``
with a fake classification task that logs a child run like ``classify`` does,
sleeps ``--delay`` seconds, and with ``--hang-flag`` hangs in its first
configuration after writing that configuration's key to the flag file.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from granularity.tracking.keys import config_key

HEARTBEAT_S = 1
GRACE_S = 2
WORKER_TIMEOUT_S = 240

PRESET = """
name: tiny
dataset:
  path: {data}
  format: consep
  class_map: classes.yaml
classification:
  seeds: 2
  grid:
    model: [mobilenet]
    granularity: [pw, el]
    patch_size: [32]
  params: {{epochs: 1}}
"""


def fake_classification(config, parent_run_id=None, resume_run_id=None, *, delay: float = 0.0, hang_flag: Path | None = None):
    """Log a child run with the tags the study runner reads; hang in the first configuration when ``hang_flag`` is new."""
    import mlflow

    key = config_key(config)
    with mlflow.start_run(run_id=resume_run_id, parent_run_id=None if resume_run_id else parent_run_id) as run:
        mlflow.set_tags({"task": "classification", "config_key": key, "worker_pid": str(os.getpid())})
        if hang_flag is not None and not hang_flag.exists():
            hang_flag.write_text(key)
            time.sleep(WORKER_TIMEOUT_S)
        time.sleep(delay)
        mlflow.log_metric("test_f1", 0.5)
    return run.info.run_id


def _worker_main() -> int:
    from granularity.study.distributed import run_distributed_study

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--hang-flag", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {os.getpid()} %(name)s: %(message)s")

    def task(config, parent_run_id=None, resume_run_id=None):
        return fake_classification(config, parent_run_id, resume_run_id, delay=args.delay, hang_flag=args.hang_flag)

    result = run_distributed_study(
        args.preset,
        args.storage,
        experiment=args.experiment,
        tasks={"classification": task},
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
    )
    return 1 if result.failed else 0


@pytest.fixture
def preset_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = tmp_path / "tiny.yaml"
    path.write_text(PRESET.format(data=data))
    return path


def _start_worker(tmp_path: Path, name: str, preset: Path, storage: str, experiment: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    command = [sys.executable, __file__, "--preset", str(preset), "--storage", storage, "--experiment", experiment, *extra]
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, cwd=tmp_path, env=os.environ.copy(), stdout=stream, stderr=subprocess.STDOUT)
    return process, log


def _wait_ok(process: subprocess.Popen, log: Path) -> None:
    try:
        code = process.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"worker timed out; its log ends:\n{log.read_text()[-3000:]}") from None
    assert code == 0, f"worker exited with {code}; its log ends:\n{log.read_text()[-3000:]}"


def _study_runs(client, experiment: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.task = 'study'")
    children = client.search_runs([experiment_id], "tags.task = 'classification'")
    return parents, children


def _expected_keys(preset: Path, experiment: str) -> set[str]:
    from granularity.study.grid import expand_grid
    from granularity.study.preset import load_preset

    return {configuration.key for configuration in expand_grid(load_preset(preset), experiment=experiment)}


def _queue_trials(storage: str):
    import optuna

    [summary] = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)


def test_two_workers_run_each_configuration_once(tracking_stack, stack_tracking_uri, tmp_path, preset_file):
    from mlflow import MlflowClient

    storage = tracking_stack.create_database("optuna_two_workers")
    experiment = "two-workers"

    workers = [_start_worker(tmp_path, f"worker{index}", preset_file, storage, experiment, "--delay", "1") for index in range(2)]
    for process, log in workers:
        _wait_ok(process, log)

    parents, children = _study_runs(MlflowClient(), experiment)
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    assert sorted(run.data.tags["config_key"] for run in children) == sorted(_expected_keys(preset_file, experiment))
    assert {run.info.status for run in children} == {"FINISHED"}

    trials = _queue_trials(storage)
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    assert sorted(trial.user_attrs["config_key"] for trial in complete) == sorted(_expected_keys(preset_file, experiment))
    assert {trial.user_attrs["mlflow_run_id"] for trial in complete} == {run.info.run_id for run in children}


def test_killed_worker_configuration_finished_by_another(tracking_stack, stack_tracking_uri, tmp_path, preset_file):
    from mlflow import MlflowClient

    storage = tracking_stack.create_database("optuna_killed_worker")
    experiment = "killed-worker"
    flag = tmp_path / "hang.flag"

    doomed, doomed_log = _start_worker(tmp_path, "doomed", preset_file, storage, experiment, "--hang-flag", str(flag))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not flag.exists():
        assert doomed.poll() is None, f"worker exited before hanging; its log ends:\n{doomed_log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "worker never reached its first configuration"
        time.sleep(0.2)
    doomed.kill()
    doomed.wait()
    hung_key = flag.read_text()

    survivor, survivor_log = _start_worker(tmp_path, "survivor", preset_file, storage, experiment, "--delay", "0.2")
    _wait_ok(survivor, survivor_log)

    parents, children = _study_runs(MlflowClient(), experiment)
    assert len(parents) == 1
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert sorted(run.data.tags["config_key"] for run in finished) == sorted(_expected_keys(preset_file, experiment))
    assert {run.data.tags["worker_pid"] for run in finished} == {str(survivor.pid)}
    hung_runs = {run.data.tags["worker_pid"]: run.info.status for run in children if run.data.tags["config_key"] == hung_key}
    assert hung_runs == {str(doomed.pid): "KILLED", str(survivor.pid): "FINISHED"}

    hung_trials = sorted((trial for trial in _queue_trials(storage) if trial.user_attrs["config_key"] == hung_key), key=lambda trial: trial.number)
    assert [trial.state.name for trial in hung_trials] == ["FAIL", "COMPLETE"]
    assert hung_trials[1].system_attrs["failed_trial"] == hung_trials[0].number
    assert hung_trials[1].user_attrs["worker"].endswith(f":{survivor.pid}")


if __name__ == "__main__":
    sys.exit(_worker_main())
