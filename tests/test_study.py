"""Study presets, grid expansion and the runner with fake tasks that log runs like classify and segment."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from granularity.cli import main
from granularity.errors import ConfigError, DatasetError
from granularity.study.grid import expand_grid
from granularity.study.preset import load_preset
from granularity.study.runner import run_study
from granularity.tracking.keys import config_key

from conftest import reset_fluent_uri

EXPERIMENT = "study-test"

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
    granularity: [pw, el, bd]
    patch_size: [32]
  params: {{epochs: 1}}
segmentation:
  seeds: 1
  grid:
    model: [linknet]
    granularity: [pw, bd]
  params: {{epochs: 1}}
"""


@pytest.fixture
def store(tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    yield tracking_uri
    reset_fluent_uri()


@pytest.fixture
def preset_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = tmp_path / "tiny.yaml"
    path.write_text(PRESET.format(data=data))
    return path


class FakeTasks:
    """Task functions that log runs with the documented tags and metrics, and fail or stop when told to."""

    def __init__(self):
        self.calls: list[tuple[str, dict, str | None]] = []
        self.fail: set[str] = set()
        self.interrupt: set[str] = set()

    def mapping(self):
        return {"classification": self.classification, "segmentation": self.segmentation}

    def classification(self, config, parent_run_id=None, resume_run_id=None):
        return self._run("classification", config, parent_run_id, resume_run_id, {"test_precision": 0.8, "test_recall": 0.7, "test_f1": 0.75, "test_accuracy": 0.8})

    def segmentation(self, config, parent_run_id=None, resume_run_id=None):
        return self._run("segmentation", config, parent_run_id, resume_run_id, {"test_pixel_accuracy": 0.9, "test_dice": 0.8})

    def _run(self, task, config, parent_run_id, resume_run_id, metrics):
        key = config_key(config)
        self.calls.append((key, config, resume_run_id))
        run = mlflow.start_run(run_id=resume_run_id, parent_run_id=None if resume_run_id else parent_run_id)
        mlflow.set_tags({"task": task, "config_key": key, "model": config["model"], "granularity": config["granularity"], "dataset": "tiny"})
        if not resume_run_id:
            mlflow.log_param("seed", config["seed"])
        if key in self.interrupt:
            self.interrupt.discard(key)
            mlflow.log_text("checkpoint", "checkpoints/last.pt")
            mlflow.end_run("KILLED")
            raise KeyboardInterrupt
        if key in self.fail:
            self.fail.discard(key)
            mlflow.end_run("FAILED")
            raise RuntimeError("loss is NaN")
        mlflow.log_metrics(metrics)
        mlflow.end_run("FINISHED")
        return run.info.run_id


def child_statuses(parent_run_id: str) -> list[str]:
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return sorted(run.info.status for run in runs)


def test_presets_expand_to_documented_grids():
    quick = expand_grid(load_preset("quick"))
    paper = expand_grid(load_preset("paper"))

    quick_classification = [c for c in quick if c.task == "classification"]
    assert {c.config["granularity"] for c in quick} == {"pw", "el", "bd"}
    assert len({c.config["seed"] for c in quick_classification}) >= 2
    assert any(c.task == "segmentation" for c in quick)
    assert quick[0].config["dataset"].endswith("consep-256")
    assert len([c for c in paper if c.task == "classification"]) == 3 * 3 * 3 * 3
    assert len([c for c in paper if c.task == "segmentation"]) == 3 * 3 * 3
    assert len({c.key for c in paper}) == len(paper)


def test_data_root_variable_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    preset = load_preset("quick")
    assert preset.dataset["path"] == str((tmp_path / "consep-256").resolve())


def test_seeds_override_and_experiment_keep_keys(preset_file):
    preset = load_preset(preset_file)
    base = expand_grid(preset)
    three = expand_grid(preset, seeds=3, experiment="elsewhere")

    assert len(base) == 3 * 2 + 2 * 1
    assert len(three) == 3 * 3 + 2 * 3
    assert {c.key for c in base} <= {c.key for c in three}
    assert all(c.config["experiment"] == "elsewhere" for c in three)
    assert load_preset(preset_file).dataset["class_map"] == str(preset_file.parent / "classes.yaml")


def test_preset_errors_name_file_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="preset 'absent' not found"):
        load_preset("absent")
    bad = tmp_path / "bad.yaml"
    bad.write_text(PRESET.format(data=tmp_path).replace("[pw, el, bd]", "[pw, outline]"))
    with pytest.raises(ConfigError, match=r"bad.yaml: classification.grid.granularity has invalid values \['outline'\]"):
        load_preset(bad)
    unset = tmp_path / "unset.yaml"
    unset.write_text(PRESET.format(data="${GRANULARITY_TEST_UNSET}/x"))
    with pytest.raises(ConfigError, match=r"variable \$\{GRANULARITY_TEST_UNSET\} is not set"):
        load_preset(unset)


def test_study_runs_every_configuration_once(store, preset_file):
    tasks = FakeTasks()
    result = run_study(preset_file, experiment=EXPERIMENT, tasks=tasks.mapping())

    assert len(tasks.calls) == 8
    assert len(result.done) == 8
    assert result.progress_line() == "8 done, 0 skipped, 0 left of 8 configurations"
    assert child_statuses(result.parent_run_id) == ["FINISHED"] * 8
    parent = MlflowClient().get_run(result.parent_run_id)
    assert parent.data.tags["task"] == "study"
    assert parent.info.status == "FINISHED"


def test_study_rerun_skips_reruns_and_resumes(store, preset_file):
    preset = load_preset(preset_file)
    configurations = expand_grid(preset, experiment=EXPERIMENT)
    failing, interrupted = configurations[1].key, configurations[4].key
    tasks = FakeTasks()
    tasks.fail.add(failing)
    tasks.interrupt.add(interrupted)

    with pytest.raises(KeyboardInterrupt):
        run_study(preset, experiment=EXPERIMENT, tasks=tasks.mapping())
    first_parent = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id], "tags.task = 'study'")[0]
    assert first_parent.info.status == "KILLED"
    killed_run = next(run for run in MlflowClient().search_runs([first_parent.info.experiment_id]) if run.info.status == "KILLED" and run.data.tags.get("config_key") == interrupted)

    tasks.calls.clear()
    result = run_study(preset, experiment=EXPERIMENT, tasks=tasks.mapping())

    called = {key: resume for key, _, resume in tasks.calls}
    assert result.parent_run_id == first_parent.info.run_id
    assert set(called) == {failing, interrupted} | {c.key for c in configurations[5:]}
    assert called[failing] is None
    assert called[interrupted] == killed_run.info.run_id
    assert len(result.skipped) == 3
    assert len(result.resumed) == 1
    assert result.left == 0
    assert child_statuses(result.parent_run_id) == ["FAILED"] + ["FINISHED"] * 8

    tasks.calls.clear()
    again = run_study(preset, experiment=EXPERIMENT, tasks=tasks.mapping())
    assert tasks.calls == []
    assert again.progress_line() == "0 done, 8 skipped, 0 left of 8 configurations"


def test_study_goes_on_after_failure(store, preset_file):
    preset = load_preset(preset_file)
    tasks = FakeTasks()
    tasks.fail.add(expand_grid(preset, experiment=EXPERIMENT)[0].key)

    result = run_study(preset, experiment=EXPERIMENT, tasks=tasks.mapping())
    assert len(result.failed) == 1
    assert len(result.done) == 7
    assert MlflowClient().get_run(result.parent_run_id).info.status == "FAILED"


def test_stale_running_child_without_checkpoint_is_rerun(store, preset_file):
    preset = load_preset(preset_file)
    first = expand_grid(preset, experiment=EXPERIMENT)[0]
    tasks = FakeTasks()
    result = run_study(preset, experiment=EXPERIMENT, tasks=tasks.mapping())
    client = MlflowClient()
    finished = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], f"tags.config_key = '{first.key}'")[0]
    # A process killed without a checkpoint leaves its run RUNNING; the runner cannot tell it from a finished one otherwise.
    client.delete_run(finished.info.run_id)
    with mlflow.start_run(parent_run_id=result.parent_run_id) as stale:
        mlflow.set_tags({"task": "classification", "config_key": first.key})
    client.update_run(stale.info.run_id, status="RUNNING")

    tasks.calls.clear()
    run_study(preset, experiment=EXPERIMENT, tasks=tasks.mapping())
    assert [(key, resume) for key, _, resume in tasks.calls] == [(first.key, None)]
    assert client.get_run(stale.info.run_id).info.status == "KILLED"


def test_cli_missing_dataset_exits_2(store, preset_file, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    preset_file.write_text(PRESET.format(data=missing))
    assert main(["study", "--preset", str(preset_file), "--experiment", EXPERIMENT]) == 2
    error = capsys.readouterr().err
    assert f"dataset folder {missing} not found" in error
    assert "https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/" in error


def test_cli_unknown_preset_exits_2(store, capsys):
    assert main(["study", "--preset", "absent"]) == 2
    assert "preset 'absent' not found" in capsys.readouterr().err


def test_missing_dataset_raises_before_any_run(store, preset_file, tmp_path):
    preset_file.write_text(PRESET.format(data=tmp_path / "nowhere"))
    tasks = FakeTasks()
    with pytest.raises(DatasetError):
        run_study(preset_file, experiment=EXPERIMENT, tasks=tasks.mapping())
    assert tasks.calls == []
