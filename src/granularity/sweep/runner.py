"""Run a sweep: an Optuna study whose trials are child MLflow runs of one sweep parent run.

``run_sweep`` ties the parts together:

1. check the base configuration with every edge of the search space, so an
   invalid value fails before any trial trains;
2. open the Optuna storage and create or join the study, which maximizes
   the validation score. The study name defaults to a hash of the task, the
   base configuration and the space, so the same command continues the same
   sweep;
3. find the parent run: the caller's active run (inside ``mlflow run``), or
   the one this study recorded, or a new run tagged ``task=sweep``;
4. run trials until the study has ``n_trials`` complete or pruned trials,
   ``n_jobs`` at a time in threads of this process;
5. record the best trial on the parent: tags ``best_run_id``,
   ``best_trial`` and ``best_param.<name>``, the metric
   ``best_val_f1``/``best_val_dice`` and the artifact ``best_trial.json``.
   Tags are used because a later worker may find a better trial, and MLflow
   parameters cannot change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna

from granularity.errors import ConfigError, DatasetError, UserError
from granularity.sweep.objective import SELECTION_METRICS, TAG_SWEEP_STUDY, USER_ATTR_FAILURE, USER_ATTR_RUN_ID, TaskFunction, make_objective
from granularity.sweep.space import SearchSpace, canonical_task, default_space_path, load_space
from granularity.sweep.storage import DEFAULT_STORAGE, create_or_load_study, open_storage, redact_url, shared_setup
from granularity.tracking.keys import TAG_TASK, config_key
from granularity.tracking.params import log_params_once

logger = logging.getLogger(__name__)

TASK_SWEEP = "sweep"
DEFAULT_SWEEP_EXPERIMENT = "annotation-granularity-sweeps"
PARENT_ATTRIBUTE = "mlflow_parent_run_id"
PRUNERS = ("median", "none")

# A sweep worker that dies leaves its trial RUNNING; after this many seconds without a heartbeat another worker fails it.
HEARTBEAT_INTERVAL_S = 60

# Trial states that count towards --n-trials; a failed trial is not a result, so it does not count.
COUNTED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class SweepResult:
    """The state of a sweep's study after this process's trials, counted over every worker."""

    study_name: str
    parent_run_id: str
    complete: int
    pruned: int
    failed: int
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None

    def summary_line(self) -> str:
        line = f"study {self.study_name}: {self.complete} complete, {self.pruned} pruned, {self.failed} failed trials"
        if self.best_trial is not None:
            line += f"; best trial {self.best_trial} scored {self.best_value:.4f} with {self.best_params} (run {self.best_run_id})"
        return line


def default_task_function(task: str) -> TaskFunction:
    """Return the project's training function of ``task``; imported here because it loads torch."""
    if task == "classification":
        from granularity.training.classification import run_classification

        return run_classification

    from granularity.training.segmentation import run_segmentation

    return run_segmentation


def _config_resolver(task: str):
    if task == "classification":
        from granularity.training.classification_config import resolve_classification_config

        return resolve_classification_config

    from granularity.training.segmentation import resolve_config

    return resolve_config


def check_configuration(task: str, config: Mapping[str, Any], space: SearchSpace) -> None:
    """Raise ConfigError or DatasetError before the first trial when a configuration the space reaches is invalid.

    Every edge of every range and every choice is put into the base
    configuration alone and checked by the task's own validation.
    """
    resolve = _config_resolver(task)
    resolve(config)
    for parameter in space.parameters:
        for value in parameter.corner_values():
            try:
                resolve({**config, parameter.name: value})
            except ConfigError as error:
                raise ConfigError(f"{space.source}: parameter {parameter.name} value {value!r} is invalid for {task}: {error}") from None

    dataset = config.get("dataset")
    if dataset and not Path(str(dataset)).is_dir():
        raise DatasetError(f"dataset folder {dataset} not found; pass an existing folder with --dataset")


def default_study_name(task: str, config: Mapping[str, Any], space: SearchSpace) -> str:
    """Return ``sweep-<task>-<hash>``, the hash covering the base configuration and the space."""
    short = "classify" if task == "classification" else "segment"
    return f"sweep-{short}-{config_key({**config, '__space__': space.as_dict()})}"


def build_pruner(pruner: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    """Return Optuna's pruner for ``median`` or ``none``; a pruner object is returned as it is."""
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner == "median":
        # Scores after the first epoch of a fresh model are noisy, so trials are compared from the second epoch on.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner {pruner!r} is invalid; use one of {', '.join(PRUNERS)}")


def _caller_run_id() -> str | None:
    """Return the run this process was started in (fluent active run, or ``mlflow run``'s MLFLOW_RUN_ID), or None."""
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    # With the variable left set, the first trial's start_run would reopen that run instead of starting a child.
    return run_id


def _open_parent_run(client, experiment_id: str, study_name: str, task: str, storage_url: str, config: Mapping[str, Any], space: SearchSpace, n_trials: int) -> str:
    """Return the newest sweep parent run of ``study_name`` in the experiment, marked RUNNING, or create one."""
    from granularity.tracking.run import config_params

    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{TAG_TASK} = '{TASK_SWEEP}' and tags.{TAG_SWEEP_STUDY} = '{study_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logger.info("continuing sweep %s in parent run %s", study_name, run_id)
        return run_id

    tags = {TAG_TASK: TASK_SWEEP, TAG_SWEEP_STUDY: study_name, "sweep_task": task, "optuna_storage": redact_url(storage_url)}
    run = client.create_run(experiment_id, tags=tags, run_name=study_name)
    run_id = run.info.run_id
    log_params_once(run_id, {**config_params(config), "n_trials": n_trials}, client)
    client.log_dict(run_id, space.as_dict(), "search_space.json")
    logger.info("started sweep %s in parent run %s", study_name, run_id)
    return run_id


def _parent_run(client, experiment_id: str, study: optuna.Study, created: bool, open_parent) -> str:
    """Return the study's parent run id, shared by every worker; recreate it when the stored one is not in this store."""
    from mlflow.exceptions import MlflowException

    run_id = shared_setup(study, created, PARENT_ATTRIBUTE, open_parent)
    try:
        stored = client.get_run(run_id)
        if stored.info.experiment_id == experiment_id and stored.info.lifecycle_stage == "active":
            return run_id
    except MlflowException:
        pass
    logger.warning("parent run %s recorded in study %s is not in this experiment; using a run found or created here", run_id, study.study_name)
    run_id = open_parent()
    study.set_user_attr(PARENT_ATTRIBUTE, run_id)
    return run_id


def record_best_trial(client, parent_run_id: str, study: optuna.Study, metric: str) -> SweepResult:
    """Count the study's trials and set the best complete trial's tags, metric and ``best_trial.json`` on the parent."""
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(1 for trial in trials if trial.state == state) for state in optuna.trial.TrialState}
    result = SweepResult(
        study_name=study.study_name,
        parent_run_id=parent_run_id,
        complete=counts[optuna.trial.TrialState.COMPLETE],
        pruned=counts[optuna.trial.TrialState.PRUNED],
        failed=counts[optuna.trial.TrialState.FAIL],
    )
    if result.complete == 0:
        return result

    best = study.best_trial
    result.best_trial = best.number
    result.best_value = float(best.value)
    result.best_params = dict(best.params)
    result.best_run_id = best.user_attrs.get(USER_ATTR_RUN_ID)

    tags = {"best_trial": str(best.number), "best_run_id": result.best_run_id or ""}
    tags.update({f"best_param.{name}": str(value) for name, value in best.params.items()})
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    client.log_metric(parent_run_id, f"best_{metric}", result.best_value, step=len(trials))
    client.log_dict(
        parent_run_id,
        {"trial": best.number, "value": result.best_value, "metric": metric, "params": result.best_params, "run_id": result.best_run_id},
        "best_trial.json",
    )
    return result


def run_sweep(
    task: str,
    config: Mapping[str, Any],
    n_trials: int,
    *,
    n_jobs: int = 1,
    storage: str = DEFAULT_STORAGE,
    study_name: str | None = None,
    space: SearchSpace | str | Path | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    experiment: str | None = None,
    task_function: TaskFunction | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> SweepResult:
    """Tune ``config`` over ``space`` with Optuna until the study has ``n_trials`` complete or pruned trials.

    ``task`` is classify/classification or segment/segmentation; ``config``
    contains that task's options, and the space's values replace them per
    trial. ``n_jobs`` trials run at a time in threads. Any number of
    processes may run the same sweep on one ``storage``. Together they stop
    at ``n_trials`` counted trials, and the trials running when the count is
    reached still finish. ``task_function`` replaces the project's training
    function (tests use fake ones); ``sampler`` replaces Optuna's default
    TPE sampler, which is not seeded, so workers started alike draw different
    values. Raises UserError when no trial completed.
    """
    from mlflow import MlflowClient

    from granularity.tracking.uri import configure_mlflow

    task = canonical_task(task)
    if n_trials < 1:
        raise ConfigError(f"--n-trials {n_trials} is invalid; use 1 or more")
    if n_jobs < 1:
        raise ConfigError(f"--n-jobs {n_jobs} is invalid; use 1 or more")
    space = space if isinstance(space, SearchSpace) else load_space(space or default_space_path(task), task)
    experiment = experiment or str(config.get("experiment") or DEFAULT_SWEEP_EXPERIMENT)
    base_config = {**config, "experiment": experiment}
    check_configuration(task, base_config, space)
    function = task_function or default_task_function(task)

    configure_mlflow(experiment)
    client = MlflowClient()
    caller_run_id = _caller_run_id()
    if caller_run_id:
        # The trials nest under the caller's run, so they go to its experiment (inside `mlflow run`, the one it chose).
        experiment_id = client.get_run(caller_run_id).info.experiment_id
        experiment = client.get_experiment(experiment_id).name
        base_config["experiment"] = experiment
    else:
        experiment_id = client.get_experiment_by_name(experiment).experiment_id

    study_name = study_name or default_study_name(task, base_config, space)
    optuna_storage = open_storage(storage, heartbeat_interval=HEARTBEAT_INTERVAL_S)
    study, created = create_or_load_study(study_name, optuna_storage, "maximize", sampler=sampler, pruner=build_pruner(pruner))

    def open_parent() -> str:
        return _open_parent_run(client, experiment_id, study_name, task, storage, base_config, space, n_trials)

    if caller_run_id:
        parent_run_id = caller_run_id
        logger.info("trials of sweep %s nest under the active run %s", study_name, parent_run_id)
        if created:
            study.set_user_attr(PARENT_ATTRIBUTE, parent_run_id)
    else:
        parent_run_id = _parent_run(client, experiment_id, study, created, open_parent)

    counted = len(study.get_trials(deepcopy=False, states=COUNTED_STATES))
    remaining = n_trials - counted
    objective = make_objective(
        task=task, task_function=function, base_config=base_config, space=space,
        parent_run_id=parent_run_id, study_name=study_name, client=client,
    )
    owns_parent = caller_run_id is None
    try:
        if remaining > 0:
            logger.info("sweep %s: %d of %d trials done, running %d with %d at a time", study_name, counted, n_trials, remaining, n_jobs)
            study.optimize(
                objective,
                n_trials=remaining,
                n_jobs=n_jobs,
                catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=COUNTED_STATES)],
                gc_after_trial=True,
            )
        else:
            logger.info("sweep %s has %d of %d trials already; nothing to run", study_name, counted, n_trials)
    except KeyboardInterrupt:
        if owns_parent:
            client.set_terminated(parent_run_id, "KILLED")
        raise

    result = record_best_trial(client, parent_run_id, study, SELECTION_METRICS[task])
    if result.complete == 0:
        if owns_parent:
            client.set_terminated(parent_run_id, "FAILED")
        reasons = [trial.user_attrs.get(USER_ATTR_FAILURE) for trial in study.get_trials(deepcopy=False)]
        first = next((reason for reason in reasons if reason), "every trial was pruned")
        raise UserError(f"no trial of sweep {study_name} completed; the first failure: {first}")
    if owns_parent:
        client.set_terminated(parent_run_id, "FINISHED")
    logger.info(result.summary_line())
    return result
