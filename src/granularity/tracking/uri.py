"""Tracking URI resolution, the client's HTTP retry defaults and a fast reachability check before any work starts."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request

from granularity.errors import UserError
from granularity.tracking.retry import apply_http_retry_defaults

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "annotation-granularity"


def resolve_tracking_uri() -> str:
    """Return ``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise a UserError naming ``uri`` when an HTTP tracking server does not respond.

    Local stores (SQLite, file paths, PostgreSQL URIs opened by the client) are
    not checked here, because opening them reports its own error.
    """
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except urllib.error.HTTPError as error:
        # A server that responds at all (401 with basic auth, 404 behind a proxy) is reachable.
        if error.code < 500:
            return
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise UserError(
        f"tracking server {uri} cannot be reached ({reason}); start it (see README, 'Tracking server') "
        f"or unset MLFLOW_TRACKING_URI to use the embedded store {DEFAULT_TRACKING_URI}"
    )


def configure_mlflow(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the resolved tracking URI, check that it responds and select ``experiment``.

    Also sets the project's bounded HTTP retry defaults (see
    :mod:`granularity.tracking.retry`) where the user has not set them.
    """
    import mlflow

    apply_http_retry_defaults()
    uri = resolve_tracking_uri()
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)

    # Inside `mlflow run` the run already exists, and MLflow rejects a start_run in any other experiment.
    project_run_id = os.environ.get("MLFLOW_RUN_ID")
    if project_run_id:
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(project_run_id).info.experiment_id
        chosen = client.get_experiment(experiment_id).name
        if chosen != experiment:
            logger.warning(
                "mlflow run created run %s in experiment %r, so it is tracked there, not in %r; "
                "pass --experiment-name %s to mlflow run to choose the experiment",
                project_run_id, chosen, experiment, experiment,
            )
        mlflow.set_experiment(experiment_id=experiment_id)
        return uri
    found = mlflow.set_experiment(experiment)

    # When another process creates the experiment at the same moment, MLflow 3.17's set_experiment returns it
    # without making it active, and the next start_run would land in the Default experiment.
    mlflow.set_experiment(experiment_id=found.experiment_id)
    return uri
