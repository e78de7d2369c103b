"""Parameters logged once per run, even when `mlflow run` or a resumed run logged some already."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.entities import Param

logger = logging.getLogger(__name__)

# MLflow rejects parameter values longer than this many characters.
MAX_PARAM_LENGTH = 6000


def log_params_once(run_id: str, params: Mapping[str, Any], client: MlflowClient | None = None) -> dict[str, str]:
    """Log the parameters that ``run_id`` does not have yet and return them.

    MLflow raises when a parameter is logged twice with another value. Inside
    `mlflow run` the entry point's parameters are logged before the command
    starts, as the strings given with ``-P`` (``format=auto``), while the task
    logs the resolved value (``format=consep``). The value logged first is
    kept, and a differing value is reported in the log instead.
    """
    client = client or MlflowClient()
    existing = client.get_run(run_id).data.params
    new = {}
    for key, value in params.items():
        text = str(value)[:MAX_PARAM_LENGTH]
        if key not in existing:
            new[key] = text
        elif existing[key] != text:
            logger.info("parameter %s stays %r as logged first; the resolved value is %r", key, existing[key], text)
    if new:
        client.log_batch(run_id, params=[Param(key, value) for key, value in new.items()])
    return new
