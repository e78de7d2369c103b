"""A study shared by many workers through one Optuna storage: each configuration runs once, a crashed one runs again.

The queue is an Optuna study, by default named ``study-<preset name>-<study
key>`` (the key that also finds the MLflow parent run). Each configuration
is one enqueued trial whose user attributes hold its ``config_key``, task,
description and the whole configuration, so any worker can run it.

- Claiming: a worker switches the oldest WAITING trial to RUNNING. The
  storage lets only one worker make that switch, so no two workers claim
  one trial.
- Heartbeats: while it trains, the worker records a heartbeat every
  ``heartbeat_interval`` seconds. A trial without one for the grace period
  (twice the interval unless given) belongs to a dead worker. The next worker
  that looks fails it, and Optuna's ``RetryHeartbeatStaleTrialCallback``
  enqueues a copy, up to ``MAX_RETRIES`` times. The worker that claims the copy
  resumes the configuration's MLflow run from its checkpoint, or runs it
  anew, as the single-process runner would.
- Setup: the worker that creates the Optuna study finds or creates the MLflow
  parent run by the preset's key, enqueues every configuration and then
  stores the parent's run id in the study. The other workers wait for that
  id, then enqueue the configurations the queue lacks: other seeds, or
  configurations that failed before, which a new worker thus retries.
- Duplicates: two workers that enqueue the same missing configuration at
  once both add a trial. A claimed trial is dropped (PRUNED, with the user
  attribute ``duplicate_of``) when another trial of its configuration is
  COMPLETE, or RUNNING with a lower number.
- End: a worker stops when no trial is WAITING or RUNNING, and then marks the
  parent run FINISHED, or FAILED when a configuration did not complete.

A completed trial's value is the configuration's wall-clock time in seconds.
The results themselves are in MLflow.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from granularity.errors import ConfigError
from granularity.study.grid import StudyConfiguration
from granularity.study.preset import Preset
from granularity.study.runner import (
    TAG_STUDY_CONFIG_KEY,
    StudyResult,
    TaskFunction,
    detach_project_run,
    load_study,
    open_parent_run,
    run_configuration,
)
from granularity.sweep.storage import create_or_load_study, open_storage, redact_url, shared_setup
from granularity.tracking.keys import TAG_CONFIG_KEY, config_key
from granularity.tracking.search import PARENT_RUN_TAG

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 60
# A configuration whose worker dies this many times stays failed until a new worker starts and retries it.
MAX_RETRIES = 3

PARENT_ATTRIBUTE = "mlflow_parent_run_id"
ATTR_CONFIG_KEY = "config_key"
ATTR_TASK = "task"
ATTR_CONFIG = "config"
ATTR_DESCRIPTION = "description"
ATTR_OUTCOME = "outcome"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_WORKER = "worker"
ATTR_DUPLICATE_OF = "duplicate_of"
ATTR_FAILURE = "failure_reason"

TAG_QUEUE = "optuna_study"
TAG_WORKER = "study_worker"


def queue_name(preset: Preset) -> str:
    """Return the default Optuna study name of a preset: ``study-<name>-<key of the preset without seeds>``."""
    return f"study-{preset.name}-{config_key(preset.as_dict(with_seeds=False))}"


def worker_name() -> str:
    """Return ``host:pid``, which names this worker in trial attributes and run tags."""
    return f"{socket.gethostname()}:{os.getpid()}"


class TrialHeartbeat:
    """Record a trial's heartbeat every ``interval_s`` seconds in a background thread while the block runs."""

    def __init__(self, storage, trial_id: int, interval_s: float) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> "TrialHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as error:  # noqa: BLE001 - a database hiccup must not end the training it guards
                if not failing:
                    logger.warning("heartbeat of trial %d failed: %s; retrying every %.0f s", self.trial_id, error, self.interval_s)
                failing = True
                continue
            if failing:
                logger.info("heartbeat of trial %d recorded again", self.trial_id)
                failing = False


def trial_id_of(storage, study_id: int, trial: FrozenTrial) -> int:
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


def enqueue_missing(study: optuna.Study, configurations: list[StudyConfiguration]) -> int:
    """Enqueue every configuration without a WAITING, RUNNING or COMPLETE trial; return how many were added."""
    present = {
        trial.user_attrs.get(ATTR_CONFIG_KEY)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))
    }
    added = 0
    for configuration in configurations:
        if configuration.key in present:
            continue
        attributes = {
            ATTR_CONFIG_KEY: configuration.key,
            ATTR_TASK: configuration.task,
            ATTR_DESCRIPTION: configuration.describe(),
            ATTR_CONFIG: dict(configuration.config),
        }
        study.enqueue_trial({}, user_attrs=attributes)
        added += 1
    if added:
        logger.info("enqueued %d configurations in Optuna study %s", added, study.study_name)
    return added


def claim_next(storage, study_id: int) -> FrozenTrial | None:
    """Switch the oldest WAITING trial to RUNNING, record its first heartbeat and return it; None when none waits."""
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = trial_id_of(storage, study_id, trial)
        try:
            # Only one worker's switch succeeds; the others get False or UpdateFinishedTrialError and try the next trial.
            claimed = storage.set_trial_state_values(trial_id, TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if claimed:
            # NOTE: a worker killed before this heartbeat leaves a RUNNING trial that never turns stale;
            # Optuna counts only trials with a heartbeat. Fail it by hand (optuna CLI or the dashboard) to rerun it.
            storage.record_heartbeat(trial_id)
            return storage.get_trial(trial_id)
    return None


def duplicate_of(study: optuna.Study, claimed: FrozenTrial) -> int | None:
    """Return the number of another trial that makes ``claimed`` redundant, or None."""
    key = claimed.user_attrs.get(ATTR_CONFIG_KEY)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if trial.number == claimed.number or trial.user_attrs.get(ATTR_CONFIG_KEY) != key:
            continue
        if trial.state == TrialState.COMPLETE or trial.number < claimed.number:
            return trial.number
    return None


def configuration_runs(client, experiment_id: str, parent_run_id: str, key: str) -> list:
    """Return the parent's child runs of the configuration ``key``, newest first."""
    runs = {}
    for tag in (TAG_CONFIG_KEY, TAG_STUDY_CONFIG_KEY):
        found = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.{tag} = '{key}'")
        runs.update({run.info.run_id: run for run in found})
    return sorted(runs.values(), key=lambda run: run.info.start_time or 0, reverse=True)


def _verified_parent(client, experiment_id: str, study: optuna.Study, parent_run_id: str, preset: Preset) -> str:
    """Return ``parent_run_id`` when it is a live run of this experiment, else the parent found or created by key."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(parent_run_id)
        if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
            return parent_run_id
    except MlflowException:
        pass
    logger.warning("parent run %s stored in Optuna study %s is not in this experiment; finding the study's parent by key", parent_run_id, study.study_name)
    parent_run_id = open_parent_run(client, experiment_id, preset)
    study.set_user_attr(PARENT_ATTRIBUTE, parent_run_id)
    return parent_run_id


def _finish_trial(storage, trial_id: int, state: TrialState, attributes: Mapping[str, object], value: float | None = None) -> None:
    for key, item in attributes.items():
        storage.set_trial_user_attr(trial_id, key, item)
    storage.set_trial_state_values(trial_id, state, values=None if value is None else [value])


def run_distributed_study(
    preset: Preset | str | Path,
    storage: str,
    *,
    study_name: str | None = None,
    seeds: int | None = None,
    experiment: str | None = None,
    tasks: Mapping[str, TaskFunction] | None = None,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_S,
    grace_period: int | None = None,
) -> StudyResult:
    """Work on the study of ``preset`` as one of any number of workers sharing the Optuna ``storage``; return what happened.

    Returns when no configuration is waiting or running on any worker.
    ``tasks`` is as for :func:`granularity.study.runner.run_study`.
    Ctrl-C puts the configuration this worker was training back into the
    queue, where a live worker resumes it from its checkpoint, and re-raises.
    """
    from mlflow import MlflowClient

    from granularity.tracking.uri import DEFAULT_EXPERIMENT, configure_mlflow

    if heartbeat_interval < 1:
        raise ConfigError(f"--heartbeat-interval {heartbeat_interval} is invalid; use 1 second or more")
    experiment = experiment or DEFAULT_EXPERIMENT
    preset, configurations, task_functions = load_study(preset, seeds, experiment, tasks)

    configure_mlflow(experiment)
    detach_project_run()
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id

    with warnings.catch_warnings():
        # Optuna marks its heartbeat helpers as experimental; the warning would repeat on every worker.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    optuna_storage = open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period, heartbeat_stale_trial_callback=retry)
    name = study_name or queue_name(preset)
    study, created = create_or_load_study(name, optuna_storage, "minimize")
    study_id = optuna_storage.get_study_id_from_name(name)

    def setup() -> str:
        parent = open_parent_run(client, experiment_id, preset)
        client.set_tag(parent, TAG_QUEUE, f"{redact_url(storage)} {name}")
        enqueue_missing(study, configurations)
        return parent

    parent_run_id = shared_setup(study, created, PARENT_ATTRIBUTE, setup)
    parent_run_id = _verified_parent(client, experiment_id, study, parent_run_id, preset)
    if not created:
        enqueue_missing(study, configurations)

    me = worker_name()
    result = StudyResult(parent_run_id=parent_run_id, total=len(configurations))
    logger.info("worker %s joined study %s (Optuna study %s at %s, parent run %s)", me, preset.name, name, redact_url(storage), parent_run_id)

    waiting_logged = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        claimed = claim_next(optuna_storage, study_id)
        if claimed is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                break
            if not waiting_logged:
                logger.info("worker %s: no configuration waiting; %d running on other workers, checking every %d s", me, len(running), heartbeat_interval)
                waiting_logged = True
            time.sleep(heartbeat_interval)
            continue

        waiting_logged = False
        client.update_run(parent_run_id, status="RUNNING")
        _work_on(claimed, study, optuna_storage, study_id, client, experiment_id, parent_run_id, task_functions, result, heartbeat_interval, me)
        logger.info("study %s: %s", preset.name, result.progress_line())

    _summarize(study, configurations, result, me)
    status = "FAILED" if result.failed else "FINISHED"
    client.set_terminated(parent_run_id, status)
    logger.info("worker %s done with study %s: %s; parent run %s %s", me, preset.name, result.progress_line(), parent_run_id, status)
    return result


def _work_on(
    claimed: FrozenTrial,
    study: optuna.Study,
    storage,
    study_id: int,
    client,
    experiment_id: str,
    parent_run_id: str,
    task_functions: Mapping[str, TaskFunction],
    result: StudyResult,
    heartbeat_interval: int,
    me: str,
) -> None:
    """Run the configuration of one claimed trial under its heartbeat and record the outcome in the trial."""
    trial_id = trial_id_of(storage, study_id, claimed)
    attributes = claimed.user_attrs
    configuration = StudyConfiguration(task=attributes[ATTR_TASK], config=dict(attributes[ATTR_CONFIG]), key=attributes[ATTR_CONFIG_KEY])

    earlier = duplicate_of(study, claimed)
    if earlier is not None:
        logger.info("trial %d repeats trial %d (%s); dropped", claimed.number, earlier, configuration.describe())
        _finish_trial(storage, trial_id, TrialState.PRUNED, {ATTR_DUPLICATE_OF: earlier, ATTR_WORKER: me})
        return
    if configuration.task not in task_functions:
        logger.error("trial %d needs task %s, which this worker lacks; marked failed", claimed.number, configuration.task)
        _finish_trial(storage, trial_id, TrialState.FAIL, {ATTR_FAILURE: f"no task function for {configuration.task} on {me}", ATTR_WORKER: me})
        return

    started = time.monotonic()
    try:
        with TrialHeartbeat(storage, trial_id, heartbeat_interval):
            runs = configuration_runs(client, experiment_id, parent_run_id, configuration.key)
            outcome, run_id = run_configuration(client, configuration, runs, parent_run_id, task_functions, result)
    except KeyboardInterrupt:
        _finish_trial(storage, trial_id, TrialState.FAIL, {ATTR_FAILURE: "interrupted", ATTR_WORKER: me})
        study.enqueue_trial({}, user_attrs={key: attributes[key] for key in (ATTR_CONFIG_KEY, ATTR_TASK, ATTR_DESCRIPTION, ATTR_CONFIG)})
        logger.warning("worker %s interrupted during %s; the configuration is back in the queue", me, configuration.describe())
        raise
    except BaseException as error:
        _finish_trial(storage, trial_id, TrialState.FAIL, {ATTR_FAILURE: f"{type(error).__name__}: {error}"[:1000], ATTR_WORKER: me})
        raise

    done = {ATTR_OUTCOME: outcome, ATTR_WORKER: me}
    if run_id:
        done[ATTR_RUN_ID] = run_id
        client.set_tag(run_id, TAG_WORKER, me)
    if outcome == "failed":
        _finish_trial(storage, trial_id, TrialState.FAIL, done)
    else:
        _finish_trial(storage, trial_id, TrialState.COMPLETE, done, value=time.monotonic() - started)


def _summarize(study: optuna.Study, configurations: list[StudyConfiguration], result: StudyResult, me: str) -> None:
    """Fill ``elsewhere`` and ``failed`` of ``result`` from the final state of the queue."""
    completed_by: dict[str, str] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        completed_by.setdefault(trial.user_attrs.get(ATTR_CONFIG_KEY), trial.user_attrs.get(ATTR_WORKER, ""))

    mine = set(result.done) | set(result.skipped)
    result.failed = []
    for configuration in configurations:
        description = configuration.describe()
        if configuration.key not in completed_by:
            result.failed.append(description)
        elif completed_by[configuration.key] != me and description not in mine:
            result.elsewhere.append(description)
