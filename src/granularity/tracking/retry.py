"""Bounded HTTP retries for the tracking server, and the error a run raises when the server stops responding.

MLflow's REST client (``mlflow.utils.rest_utils.http_request``, MLflow 3.x)
retries a request after a refused connection, a timeout or HTTP 429, 500,
502, 503 and 504, sleeping ``backoff_factor * 2 ** (n - 1)`` seconds before
retry n from the second one on (urllib3's ``Retry``). Its defaults (7
retries, factor 2, 120 s timeout) keep a training process waiting about four
minutes per request on a server that is gone. :func:`apply_http_retry_defaults`
sets shorter defaults unless the user has set the variables.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

from granularity.errors import UserError


MAX_RETRIES_VARIABLE = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_FACTOR_VARIABLE = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
TIMEOUT_VARIABLE = "MLFLOW_HTTP_REQUEST_TIMEOUT"

# 4 retries with factor 2 sleep 0 + 4 + 8 + 16 s (plus up to 1 s of jitter each), so a client gives up on a
# stopped server after about 30 s. That still outlasts a PostgreSQL restart behind the server.
# The timeout bounds each attempt on a server that accepts connections but does not respond.
HTTP_RETRY_DEFAULTS = {
    MAX_RETRIES_VARIABLE: "4",
    BACKOFF_FACTOR_VARIABLE: "2",
    TIMEOUT_VARIABLE: "60",
}

# One attempt with a short timeout, for the calls that end a run after the server has stopped responding.
SINGLE_ATTEMPT = {MAX_RETRIES_VARIABLE: "0", TIMEOUT_VARIABLE: "5"}

# MLflow wraps every transport failure of its REST client in an MlflowException with this message start.
# A server that responds with an error status gives "API request to endpoint ... failed with error code" instead.
_TRANSPORT_FAILURE = re.compile(r"^API request to \S+ failed with (exception|timeout)")
_CAUSE = re.compile(r"Caused by \w+\((.*)")


class TrackingServerUnavailable(UserError):
    """The tracking server stopped responding while a run was logging to it.

    The run's local checkpoints are kept, and the message names the
    ``--resume`` option to use once the server is back.
    """


def apply_http_retry_defaults() -> dict[str, str]:
    """Set the project's retry, backoff and timeout defaults for MLflow's HTTP client where the user set none.

    Returns the values in effect, by variable name.
    """
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in HTTP_RETRY_DEFAULTS}


def is_server_failure(error: BaseException) -> bool:
    """Return True when ``error`` means the tracking server did not respond, rather than rejecting a request.

    Covers MLflow's wrapped transport failures (refused connections,
    timeouts, retries exhausted on HTTP 5xx) and raw ``requests`` connection
    errors and timeouts, also when they are the ``__cause__`` of another exception.
    """
    import requests
    from mlflow.exceptions import MlflowException

    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if isinstance(current, MlflowException):
            if _TRANSPORT_FAILURE.match(str(current.message)):
                return True
        current = current.__cause__
    return False


def failure_summary(error: BaseException) -> str:
    """Return a short reason for a server failure, e.g. ``[Errno 111] Connection refused``."""
    text = str(getattr(error, "message", error))
    match = _CAUSE.search(text)
    if match:
        # urllib3 nests the reason as Error("Pool(...): reason"), so the text after the last ": " is the reason.
        cause = match.group(1).strip("\"'() ")
        return cause.rsplit(": ", 1)[-1].strip("\"'() .")
    if "timeout" in text.lower():
        return "request timed out"
    return text.splitlines()[0][:200] if text else type(error).__name__


@contextmanager
def single_attempt() -> Iterator[None]:
    """Make MLflow's HTTP client try each request once, with a 5 s timeout, inside the block.

    MLflow reads the variables on every request, so the block applies to
    calls in other threads too while it lasts.
    """
    previous = {name: os.environ.get(name) for name in SINGLE_ATTEMPT}
    os.environ.update(SINGLE_ATTEMPT)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def retry_settings() -> str:
    """Return the retry settings in effect, as text for messages."""
    return (
        f"{os.environ.get(MAX_RETRIES_VARIABLE, HTTP_RETRY_DEFAULTS[MAX_RETRIES_VARIABLE])} retries, "
        f"backoff factor {os.environ.get(BACKOFF_FACTOR_VARIABLE, HTTP_RETRY_DEFAULTS[BACKOFF_FACTOR_VARIABLE])}"
    )
