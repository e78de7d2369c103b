"""The MLflow run context every task trains in: start or resume, tag, log, and end with a status.

Usage, the same for every task::

    with tracked_run(task="classification", config=config, tags=tags,
                     resume_run_id=resume_run_id) as run:
        if not run.resumed:
            run.log_dataset_input(table, name=..., digest=..., source=...)
        ...
        run.log_metrics({"train_loss": 0.4}, step=epoch)

What :func:`tracked_run` does:

- checks that the tracking server responds before anything else (a UserError
  naming the URI when it does not), then selects the experiment;
- starts a new run, nested under ``parent_run_id`` when given, or reopens
  ``resume_run_id``;
- on a new run, logs every configuration value as a parameter and the
  configuration as ``config.json``; a resumed run logs neither again,
  because MLflow rejects a parameter logged twice with another value;
- sets the tags ``task``, ``config_key`` and ``git_commit`` (with
  ``-dirty`` when tracked files changed) plus the task's
  own tags, and starts MLflow's system metrics;
- ends the run FINISHED, FAILED with the tag ``failure_reason`` on any
  exception, or KILLED on KeyboardInterrupt, and re-raises the exception;
- when the tracking server stops responding mid-run (after MLflow's HTTP
  retries, see :mod:`granularity.tracking.retry`), tries once to mark the
  run KILLED, forgets it in this process, and raises
  :class:`~granularity.tracking.retry.TrackingServerUnavailable`, which
  names the server and the ``--resume`` to run once it is back. Local
  checkpoints are never deleted here.

:meth:`TrackedRun.log_metrics` drops every value whose step the run has
logged already, so an epoch repeated after a resume is not logged twice.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import optuna
import pandas as pd
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from granularity.errors import UserError
from granularity.tracking.keys import TAG_CONFIG_KEY, TAG_GIT_COMMIT, TAG_TASK, config_key
from granularity.tracking.params import log_params_once
from granularity.tracking.provenance import git_commit
from granularity.tracking.retry import (
    TrackingServerUnavailable,
    failure_summary,
    is_server_failure,
    retry_settings,
    single_attempt,
)
from granularity.tracking.uri import DEFAULT_EXPERIMENT, configure_mlflow

logger = logging.getLogger(__name__)

TAG_FAILURE_REASON = "failure_reason"
CONFIG_ARTIFACT = "config.json"

# MLflow 3 stores parameter values of up to 6000 characters.
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 5000

# The classification task keeps each run's checkpoints in <working directory>/checkpoints/<run id>/.
LOCAL_CHECKPOINT_ROOT = Path("checkpoints")

def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Return ``config`` as MLflow parameters: nested mappings flattened with dots, values as text."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            for inner_key, inner_value in config_params(value).items():
                params[f"{key}.{inner_key}"] = inner_value
            continue
        text = "" if value is None else str(value)
        if len(text) > MAX_PARAM_LENGTH:
            logger.warning("parameter %s is %d characters long; MLflow keeps the first %d", key, len(text), MAX_PARAM_LENGTH)
            text = text[:MAX_PARAM_LENGTH]
        params[key] = text
    return params


def load_run_config(run_id: str, task: str | None = None) -> dict[str, Any]:
    """Return the configuration a run logged as ``config.json``.

    Raises UserError when the run does not exist, is not a ``task`` run (when
    given), or has no configuration.
    """
    client = MlflowClient()
    run = _get_run(client, run_id)
    run_task = run.data.tags.get(TAG_TASK)
    if task is not None and run_task != task:
        command = {"classification": "classify", "segmentation": "segment"}.get(run_task or "", "")
        hint = f"resume it with `granularity {command} --resume {run_id}`" if command else f"pass the id of a {task} run"
        raise UserError(f"run {run_id} is a {run_task or 'untagged'} run, not a {task} run; {hint}")
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    except (MlflowException, OSError) as error:
        raise UserError(
            f"run {run_id} has no {CONFIG_ARTIFACT} artifact ({error}); it was not started by granularity, start a new run"
        ) from error


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise UserError(
            f"run {run_id} not found at tracking URI {mlflow.get_tracking_uri()}; "
            "check the run id in the MLflow UI and MLFLOW_TRACKING_URI"
        ) from error


@dataclass
class TrackedRun:
    """An active MLflow run with the logging helpers the training tasks use.

    Attributes:
        run_id: the MLflow run id.
        resumed: True when the run was reopened with ``resume_run_id``.
        client: the MLflow client bound to the tracking URI.
    """

    run_id: str
    resumed: bool
    client: MlflowClient
    _last_steps: dict[str, int | None] = field(default_factory=dict)

    def last_logged_step(self, key: str) -> int | None:
        """Return the largest step logged for metric ``key`` in this run, None when it has none.

        A new run has logged nothing before this process, so only a resumed
        run reads the metric history from the server.
        """
        if key not in self._last_steps:
            if self.resumed:
                history = self.client.get_metric_history(self.run_id, key)
                self._last_steps[key] = max((metric.step for metric in history), default=None)
            else:
                self._last_steps[key] = None
        return self._last_steps[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> dict[str, float]:
        """Log ``metrics`` at ``step``, skipping keys already logged at this or a later step.

        Non-finite values are logged as they are, so a NaN loss stays visible.
        Returns the metrics that were logged.
        """
        fresh = {}
        for key, value in metrics.items():
            last = self.last_logged_step(key)
            if last is not None and step <= last:
                logger.debug("metric %s step %d was logged before (last step %d); skipped", key, step, last)
                continue
            fresh[key] = float(value)
        if fresh:
            mlflow.log_metrics(fresh, step=step)
            for key in fresh:
                self._last_steps[key] = step
        return fresh

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({key: str(value) for key, value in tags.items()})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(local_path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping, artifact_file: str) -> None:
        mlflow.log_dict(dict(data), artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)

    def log_table(self, table: pd.DataFrame, artifact_file: str) -> None:
        """Log ``table`` as a CSV artifact (``artifact_file`` ends with .csv)."""
        mlflow.log_text(table.to_csv(index=False), artifact_file)

    def log_dataset_input(
        self,
        table: pd.DataFrame,
        *,
        name: str,
        digest: str,
        source: str,
        context: str = "training",
        targets: str | None = None,
    ) -> None:
        """Log ``table`` as an MLflow dataset input with the prepared dataset's name and digest.

        MLflow stores the table's schema and profile, not its rows.
        """
        # MLflow warns that a local path could be several source types, and that integer columns cannot hold NaN;
        # neither applies to a window table.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=source, name=name, digest=digest[:36], targets=targets)
        mlflow.log_input(dataset, context=context)


def _failure_reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text[:MAX_TAG_LENGTH]


def _call_server(call, quick: bool) -> BaseException | None:
    """Run ``call``; return the server failure it raised, or None. Other exceptions propagate.

    With ``quick`` the call gets one attempt, because the server has
    already failed once and the full retries would only delay the exit.
    """
    try:
        if quick:
            with single_attempt():
                call()
        else:
            call()
    except Exception as error:
        if not is_server_failure(error):
            raise
        return error
    return None


def _end_run(run: TrackedRun, status: str, reason: str | None, quick: bool = False) -> BaseException | None:
    """Tag ``reason``, end the active run with ``status``, and return the server failure that stopped either.

    ``mlflow.end_run`` removes the run from this process's active runs
    before it contacts the server, so the run is ended locally even when the
    server never hears of it and keeps showing it RUNNING.
    """
    def terminate() -> None:
        # A study's parent run stays active below this one, so end_run must not pop it when this run is gone already.
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.run_id:
            mlflow.end_run(status)
        else:
            run.client.set_terminated(run.run_id, status)

    failure = None
    if reason is not None:
        failure = _call_server(lambda: run.client.set_tag(run.run_id, TAG_FAILURE_REASON, reason), quick)
    end_failure = _call_server(terminate, quick or failure is not None)
    return failure or end_failure


def _server_unavailable(run: TrackedRun, uri: str, error: BaseException) -> TrackingServerUnavailable:
    """End ``run`` as KILLED where one quick attempt still reaches the server; return the error to raise.

    KILLED, not FAILED, because the run is resumable: the study runner
    resumes KILLED runs that have checkpoints and reruns FAILED ones.
    """
    summary = failure_summary(error)
    resume_hint = f"once the server is back, resume with --resume {run.run_id}"
    if _end_run(run, RunStatus.to_string(RunStatus.KILLED), f"tracking server {uri} stopped responding ({summary}); {resume_hint}", quick=True):
        logger.warning("run %s stays RUNNING on the tracking server, which cannot be reached to mark it KILLED", run.run_id)

    checkpoint_dir = LOCAL_CHECKPOINT_ROOT / run.run_id
    checkpoint_note = f"; its checkpoints in {checkpoint_dir} are kept" if checkpoint_dir.is_dir() else ""
    return TrackingServerUnavailable(
        f"tracking server {uri} stopped responding during run {run.run_id} ({summary}; gave up after "
        f"{retry_settings()}){checkpoint_note}; {resume_hint}"
    )


@contextmanager
def tracked_run(
    *,
    task: str,
    config: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    run_name: str | None = None,
    log_system_metrics: bool = True,
) -> Iterator[TrackedRun]:
    """Start a new MLflow run or resume one, yield a :class:`TrackedRun`, and end it with its status.

    Raises UserError before any work starts when the tracking server cannot be
    reached, when ``resume_run_id`` does not exist, belongs to another task,
    or has finished already.
    """
    uri = configure_mlflow(experiment or DEFAULT_EXPERIMENT)
    client = MlflowClient()

    if resume_run_id:
        previous = _get_run(client, resume_run_id)
        previous_task = previous.data.tags.get(TAG_TASK)
        if previous_task != task:
            raise UserError(f"run {resume_run_id} is a {previous_task or 'untagged'} run, not {task}; pass the id of a {task} run to --resume")
        if previous.info.status == RunStatus.to_string(RunStatus.FINISHED):
            raise UserError(f"run {resume_run_id} has finished already; nothing to resume, start a new run instead")

    # A study keeps its parent run active in this process; MLflow then needs nested=True.
    nested = mlflow.active_run() is not None
    try:
        active = mlflow.start_run(
            run_id=resume_run_id,
            run_name=None if resume_run_id else run_name,
            nested=nested,
            parent_run_id=None if resume_run_id else parent_run_id,
            log_system_metrics=log_system_metrics,
        )
    except Exception as error:
        if not is_server_failure(error):
            raise
        raise TrackingServerUnavailable(
            f"tracking server {uri} stopped responding while the run started ({failure_summary(error)}); "
            "start the command again once the server is back"
        ) from error
    run = TrackedRun(run_id=active.info.run_id, resumed=bool(resume_run_id), client=client)
    logger.info("%s MLflow run %s at %s", "resumed" if run.resumed else "started", run.run_id, uri)

    try:
        run_tags = {TAG_TASK: task, TAG_CONFIG_KEY: config_key(config), TAG_GIT_COMMIT: git_commit()}
        run_tags.update(tags or {})
        run.set_tags(run_tags)

        if run.resumed:
            # The reason the previous attempt stopped no longer describes the run.
            if TAG_FAILURE_REASON in previous.data.tags:
                client.delete_tag(run.run_id, TAG_FAILURE_REASON)
        else:
            log_params_once(run.run_id, config_params(config), client)
            run.log_dict(dict(config), CONFIG_ARTIFACT)

        yield run
    except KeyboardInterrupt:
        logger.warning("run %s interrupted; marked KILLED, resume it with --resume %s", run.run_id, run.run_id)
        reason = f"interrupted (KeyboardInterrupt); resume with --resume {run.run_id}"
        if _end_run(run, RunStatus.to_string(RunStatus.KILLED), reason):
            logger.warning("run %s could not be marked KILLED: the tracking server %s does not respond", run.run_id, uri)
        raise
    except optuna.TrialPruned:
        # A pruner stopping a sweep trial early is a decision, not a failure: the run ends KILLED with no reason tag.
        logger.info("run %s stopped by the sweep's pruner", run.run_id)
        if _end_run(run, RunStatus.to_string(RunStatus.KILLED), None):
            logger.warning("run %s could not be marked KILLED: the tracking server %s does not respond", run.run_id, uri)
        raise
    except BaseException as error:
        if is_server_failure(error):
            raise _server_unavailable(run, uri, error) from error
        reason = _failure_reason(error)
        logger.error("run %s failed: %s", run.run_id, reason)
        if _end_run(run, RunStatus.to_string(RunStatus.FAILED), reason):
            logger.warning("run %s could not be marked FAILED: the tracking server %s does not respond", run.run_id, uri)
        raise
    else:
        # NOTE: a server lost at this point has every result of the run but not its FINISHED status. The
        # resume that the error message suggests evaluates the test windows again and logs a second model.
        failure = _call_server(lambda: mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED)), quick=False)
        if failure is not None:
            raise _server_unavailable(run, uri, failure) from failure
