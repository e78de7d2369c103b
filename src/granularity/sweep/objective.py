"""The objective of a sweep: one trial trains one configuration as a child MLflow run and returns its validation score.

The task reports the selection metric (``val_f1`` for classification,
``val_dice`` for segmentation) to the trial after every epoch through the
training loop's ``on_epoch_end`` callback, so the study's pruner can stop a
bad trial early. A pruned trial's run ends KILLED with the tags
``pruned=true`` and ``pruned_epoch``; it has no test metrics, so ``compare``
leaves it out.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import optuna

from granularity.sweep.space import SearchSpace
from granularity.tracking.params import log_params_once

logger = logging.getLogger(__name__)

SELECTION_METRICS = {"classification": "val_f1", "segmentation": "val_dice"}

TAG_SWEEP_STUDY = "sweep_study"
TAG_TRIAL_NUMBER = "optuna_trial"
TAG_PRUNED = "pruned"
TAG_PRUNED_EPOCH = "pruned_epoch"
TAG_FAILURE_REASON = "failure_reason"
USER_ATTR_RUN_ID = "mlflow_run_id"
USER_ATTR_FAILURE = "failure_reason"

# task function(config, parent_run_id=..., epoch_callback=...) -> run id, like run_classification.
TaskFunction = Callable[..., str]


class EpochReporter:
    """The ``epoch_callback`` of one trial: report the selection metric per epoch and stop when the pruner decides to.

    It also notes the MLflow run the task trains in, read from the fluent
    API's active run of the calling thread, so a pruned or failed trial can
    still be tagged: the task raises before it returns the run id.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.values: dict[int, float] = {}
        self.run_id: str | None = None
        self.pruned_epoch: int | None = None

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            self.run_id = active.info.run_id

        value = float(metrics[self.metric])
        self.values[epoch] = value
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned_epoch = epoch
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned after epoch {epoch}: {self.metric} {value:.4f}")

    def best(self) -> float | None:
        """Return the best reported value (the epoch the task selects), or None when no finite value was reported."""
        finite = [value for value in self.values.values() if math.isfinite(value)]
        return max(finite) if finite else None


def best_logged_value(client, run_id: str, metric: str) -> float | None:
    """Return the largest finite value of ``metric`` in the run's history, or None."""
    values = [entry.value for entry in client.get_metric_history(run_id, metric) if math.isfinite(entry.value)]
    return max(values) if values else None


def mark_pruned(client, run_id: str, epoch: int | None) -> None:
    """Tag a pruned trial's run with the ``pruned`` tags and make sure it ended KILLED."""
    client.set_tag(run_id, TAG_PRUNED, "true")
    if epoch is not None:
        client.set_tag(run_id, TAG_PRUNED_EPOCH, str(epoch))
    client.set_terminated(run_id, "KILLED")


def make_objective(
    *,
    task: str,
    task_function: TaskFunction,
    base_config: Mapping[str, Any],
    space: SearchSpace,
    parent_run_id: str,
    study_name: str,
    client,
) -> Callable[[optuna.Trial], float]:
    """Return the objective for ``study.optimize``: train ``base_config`` with the trial's values, return the best score."""
    metric = SELECTION_METRICS[task]

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        config = {**base_config, **params}
        reporter = EpochReporter(trial, metric)
        logger.info("trial %d of study %s: %s", trial.number, study_name, params)

        try:
            run_id = task_function(config, parent_run_id=parent_run_id, epoch_callback=reporter)
        except optuna.TrialPruned:
            if reporter.run_id:
                _tag_trial_run(client, reporter.run_id, trial, study_name, params)
                mark_pruned(client, reporter.run_id, reporter.pruned_epoch)
            logger.info("trial %d pruned after epoch %s", trial.number, reporter.pruned_epoch)
            raise
        except Exception as error:
            # Optuna records the trial as failed and the sweep goes on with the next trial.
            trial.set_user_attr(USER_ATTR_FAILURE, f"{type(error).__name__}: {error}"[:1000])
            if reporter.run_id:
                _tag_trial_run(client, reporter.run_id, trial, study_name, params)
            raise

        _tag_trial_run(client, run_id, trial, study_name, params)
        value = reporter.best()
        if value is None:
            value = best_logged_value(client, run_id, metric)
        if value is None:
            raise ValueError(f"run {run_id} logged no finite {metric}; the trial has no score")
        return value

    return objective


def _tag_trial_run(client, run_id: str, trial: optuna.Trial, study_name: str, params: Mapping[str, Any]) -> None:
    trial.set_user_attr(USER_ATTR_RUN_ID, run_id)
    client.set_tag(run_id, TAG_SWEEP_STUDY, study_name)
    client.set_tag(run_id, TAG_TRIAL_NUMBER, str(trial.number))
    # The task logged its configuration already. log_params_once adds only the names it lacks and keeps a differing value.
    log_params_once(run_id, params, client)
