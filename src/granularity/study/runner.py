"""Run a study: one parent run, one child run per configuration, continuing where an earlier attempt stopped.

For each configuration the runner looks at the child runs of the study's
parent with the same ``config_key`` tag (the newest one decides):

- FINISHED: skipped;
- RUNNING or KILLED with a checkpoint under ``checkpoints/``: resumed, the
  task function gets ``resume_run_id`` (RUNNING is what a killed process
  leaves behind);
- FAILED, or RUNNING or KILLED without a checkpoint, or none: run anew.

NOTE: ``run_study`` assumes it is the only process working on a study; two
of them started on one study at once would train the same configurations.
Several workers share a study through an Optuna storage instead
(``granularity study --storage URL``, :mod:`granularity.study.distributed`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from tqdm import tqdm

from granularity.errors import DatasetError
from granularity.study.grid import StudyConfiguration, expand_grid
from granularity.study.preset import Preset, load_preset
from granularity.tracking.keys import TAG_CONFIG_KEY, TAG_STUDY, TAG_TASK, config_key
from granularity.tracking.retry import TrackingServerUnavailable
from granularity.tracking.search import PARENT_RUN_TAG, iter_runs

logger = logging.getLogger(__name__)

TASK_STUDY = "study"
TAG_STUDY_KEY = "study_key"
# Set on a child whose own config_key tag differs from the key the runner computed, so a rerun still finds it.
TAG_STUDY_CONFIG_KEY = "study_config_key"
CHECKPOINT_ARTIFACT_DIR = "checkpoints"

# task name -> function(config, parent_run_id=..., resume_run_id=...) returning the child run id.
TaskFunction = Callable[..., str]

DOWNLOAD_HINTS = {
    "consep": "download CoNSeP from https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/ and unpack its Train/ and Test/ folders there",
    "coco": "put the images and annotations.json (COCO instance format) there",
}


def default_tasks() -> dict[str, TaskFunction]:
    """Return the project's task functions; imported here because they load torch and the models."""
    from granularity.training.classification import run_classification
    from granularity.training.segmentation import run_segmentation

    return {"classification": run_classification, "segmentation": run_segmentation}


@dataclass
class StudyResult:
    """Outcome of one ``run_study`` call, or of one worker of a distributed study, by configuration description.

    ``elsewhere`` lists the configurations that other workers of a
    distributed study completed; ``run_study`` leaves it empty.
    """

    parent_run_id: str
    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)

    @property
    def left(self) -> int:
        return max(0, self.total - len(self.done) - len(self.skipped) - len(self.failed) - len(self.elsewhere))

    def progress_line(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        elsewhere = f", {len(self.elsewhere)} by other workers" if self.elsewhere else ""
        return f"{len(self.done)} done, {len(self.skipped)} skipped{elsewhere}, {self.left} left{failed} of {self.total} configurations"


def detach_project_run() -> str | None:
    """Clear ``MLFLOW_RUN_ID`` and return its value, so the study's child runs do not reopen the ``mlflow run`` run.

    Inside ``mlflow run`` the variable names the entry point's run, and
    MLflow's ``start_run`` reopens that run instead of starting a child.
    """
    return os.environ.pop("MLFLOW_RUN_ID", None)


def check_datasets(configurations: list[StudyConfiguration]) -> None:
    """Raise a DatasetError before any run starts when a dataset folder of the study is missing."""
    for path, data_format in sorted({(c.config["dataset"], c.config.get("format", "")) for c in configurations}):
        if not Path(path).is_dir():
            hint = DOWNLOAD_HINTS.get(data_format, "put the dataset there")
            raise DatasetError(
                f"dataset folder {path} not found; {hint}, or set DATA_ROOT to the folder that contains {Path(path).name}"
            )


def find_parent_run(client, experiment_id: str, study_key: str):
    """Return the newest study parent run with ``study_key`` in the experiment, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{TAG_TASK} = '{TASK_STUDY}' and tags.{TAG_STUDY_KEY} = '{study_key}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def open_parent_run(client, experiment_id: str, preset: Preset) -> str:
    """Reuse the newest parent run of this preset (whatever its status) or create one; return its id, marked RUNNING."""
    study_key = config_key(preset.as_dict(with_seeds=False))
    existing = find_parent_run(client, experiment_id, study_key)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        logger.info("continuing study %s in parent run %s", preset.name, existing.info.run_id)
        return existing.info.run_id

    tags = {TAG_TASK: TASK_STUDY, TAG_STUDY: preset.name, TAG_STUDY_KEY: study_key}
    run = client.create_run(experiment_id, tags=tags, run_name=f"study-{preset.name}")
    run_id = run.info.run_id
    client.log_param(run_id, "preset", str(preset.source))
    client.log_dict(run_id, preset.as_dict(), "preset.json")
    logger.info("started study %s in parent run %s", preset.name, run_id)
    return run_id


def existing_children(client, experiment_id: str, parent_run_id: str) -> dict[str, list]:
    """Return config key -> child runs of the parent, newest first."""
    children: dict[str, list] = {}
    for run in iter_runs(client, experiment_id, f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"):
        keys = {run.data.tags.get(TAG_CONFIG_KEY), run.data.tags.get(TAG_STUDY_CONFIG_KEY)} - {None}
        for key in keys:
            children.setdefault(key, []).append(run)
    for runs in children.values():
        runs.sort(key=lambda run: run.info.start_time or 0, reverse=True)
    return children


def has_checkpoint(client, run_id: str) -> bool:
    return bool(client.list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR))


def plan_action(client, runs: list) -> tuple[str, str | None]:
    """Return ("skip" | "resume" | "run", the run id to resume) for a configuration's earlier child runs."""
    if not runs:
        return "run", None
    if any(run.info.status == "FINISHED" for run in runs):
        return "skip", None
    newest = runs[0]
    if newest.info.status in ("RUNNING", "KILLED") and has_checkpoint(client, newest.info.run_id):
        return "resume", newest.info.run_id
    return "run", None


def _mark_stale(client, runs: list) -> None:
    # A RUNNING child that will not be resumed belongs to a dead process; mark it so the UI does not show it as live.
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


def load_study(
    preset: Preset | str | Path,
    seeds: int | None,
    experiment: str | None,
    tasks: Mapping[str, TaskFunction] | None,
) -> tuple[Preset, list[StudyConfiguration], dict[str, TaskFunction]]:
    """Load the preset, expand its configurations and check their datasets and task functions."""
    from granularity.tracking.uri import DEFAULT_EXPERIMENT

    preset = preset if isinstance(preset, Preset) else load_preset(preset)
    configurations = expand_grid(preset, seeds=seeds, experiment=experiment or DEFAULT_EXPERIMENT)
    check_datasets(configurations)
    task_functions = dict(tasks) if tasks is not None else default_tasks()
    missing = sorted({c.task for c in configurations} - set(task_functions))
    if missing:
        raise KeyError(f"no task function for {missing}")
    return preset, configurations, task_functions


def run_study(
    preset: Preset | str | Path,
    seeds: int | None = None,
    experiment: str | None = None,
    tasks: Mapping[str, TaskFunction] | None = None,
) -> StudyResult:
    """Train every configuration of ``preset`` as a child run of one parent run; return what was done.

    ``tasks`` maps task names to functions called as
    ``function(config, parent_run_id=..., resume_run_id=...)`` that return
    the child run id; by default the project's classification and
    segmentation tasks. A configuration that fails is logged and the study
    goes on; Ctrl-C marks the parent run KILLED and stops.
    """
    from mlflow import MlflowClient

    from granularity.tracking.uri import DEFAULT_EXPERIMENT, configure_mlflow

    preset, configurations, task_functions = load_study(preset, seeds, experiment, tasks)
    experiment = experiment or DEFAULT_EXPERIMENT

    configure_mlflow(experiment)
    project_run_id = detach_project_run()
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent_run_id = open_parent_run(client, experiment_id, preset)
    if project_run_id:
        client.set_tag(project_run_id, "study_parent_run_id", parent_run_id)
    children = existing_children(client, experiment_id, parent_run_id)
    result = StudyResult(parent_run_id=parent_run_id, total=len(configurations))

    try:
        for configuration in tqdm(configurations, desc=f"study {preset.name}", unit="config"):
            run_configuration(client, configuration, children.get(configuration.key, []), parent_run_id, task_functions, result)
            logger.info("study %s: %s", preset.name, result.progress_line())
    except KeyboardInterrupt:
        _end_parent_run(client, parent_run_id, "KILLED")
        logger.warning("study %s interrupted: %s; run it again to continue", preset.name, result.progress_line())
        raise
    except BaseException:
        _end_parent_run(client, parent_run_id, "FAILED")
        raise

    _end_parent_run(client, parent_run_id, "FAILED" if result.failed else "FINISHED")
    return result


def _end_parent_run(client, parent_run_id: str, status: str) -> None:
    """Set the parent run's final status; with the server down, log it and leave the run for the next study run."""
    from granularity.tracking.retry import is_server_failure

    try:
        client.set_terminated(parent_run_id, status)
    except Exception as error:
        if not is_server_failure(error):
            raise
        logger.warning("could not mark study run %s %s: tracking server did not respond (%s)", parent_run_id, status, error)


def run_configuration(
    client, configuration: StudyConfiguration, runs: list, parent_run_id: str, task_functions, result: StudyResult
) -> tuple[str, str | None]:
    """Skip, resume or run one configuration given its earlier child runs; return ("skipped" | "done" | "failed", run id).

    The outcome is also appended to ``result``. A failing task is logged and
    reported as "failed"; KeyboardInterrupt passes through.
    """
    action, resume_run_id = plan_action(client, runs)
    description = configuration.describe()
    if action == "skip":
        result.skipped.append(description)
        finished = next((run.info.run_id for run in runs if run.info.status == "FINISHED"), None)
        return "skipped", finished

    _mark_stale(client, [run for run in runs if run.info.run_id != resume_run_id])
    if resume_run_id:
        logger.info("resuming %s from run %s", description, resume_run_id)
        result.resumed.append(description)
    function = task_functions[configuration.task]
    try:
        run_id = function(dict(configuration.config), parent_run_id=parent_run_id, resume_run_id=resume_run_id)
    except (KeyboardInterrupt, TrackingServerUnavailable):
        # Without the server every later configuration would fail the same way, so the study stops here.
        raise
    except Exception as error:
        # The task marked its run FAILED with the reason; the next configurations are independent, so the study goes on.
        logger.error("configuration %s failed: %s: %s", description, type(error).__name__, error)
        result.failed.append(description)
        return "failed", None

    _tag_study_key(client, run_id, configuration)
    result.done.append(description)
    return "done", run_id


def _tag_study_key(client, run_id: str | None, configuration: StudyConfiguration) -> None:
    if not run_id:
        return
    logged_key = client.get_run(run_id).data.tags.get(TAG_CONFIG_KEY)
    if logged_key != configuration.key:
        # The project's tasks hash their configuration after filling in defaults, so the keys differ on every run; not a fault.
        logger.info(
            "run %s logged config_key %s, not %s as computed by the study; tagged %s so a rerun finds it",
            run_id, logged_key, configuration.key, TAG_STUDY_CONFIG_KEY,
        )
        client.set_tag(run_id, TAG_STUDY_CONFIG_KEY, configuration.key)
