"""Optuna storage shared by the workers of a sweep or a distributed study, and the setup only one of them does.

The storage is an Optuna RDB storage: an SQLite file for one machine
(``sqlite:///optuna.db``, the default) or PostgreSQL for many
(``postgresql+psycopg2://user:password@host:5432/optuna``). With a heartbeat
interval, every running trial records a heartbeat, and a trial whose
heartbeat is older than the grace period is failed by the next worker that
checks (``optuna.storages.fail_stale_trials``).

Several workers may start at once on a new study. The one whose
``create_study`` call creates it runs the setup (for example, it creates the
MLflow parent run) and stores the setup's result as a study user attribute.
The others wait for that attribute, so all of them share one parent run.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import optuna
from optuna.storages import RDBStorage

from granularity.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql")
STORAGE_EXAMPLES = "sqlite:///optuna.db or postgresql+psycopg2://user:password@host:5432/optuna"

# Seconds a worker waits for the worker that created the study to finish its setup, then does the setup itself.
SETUP_TIMEOUT_S = 60.0
SETUP_POLL_S = 0.5

# Workers started at once on an empty database race to create Optuna's tables; the losers try again.
CREATE_ATTEMPTS = 3
CREATE_RETRY_S = 1.0

# SQLite waits this many seconds for a lock held by another thread or process instead of failing at once.
SQLITE_LOCK_TIMEOUT_S = 60


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, for logs, tags and messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def storage_scheme(url: str) -> str:
    """Return the database of a storage URL: ``sqlite``, ``postgresql`` or ``mysql``; raise ConfigError otherwise."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(f"storage URL {redact_url(url)!r} is not supported; use {STORAGE_EXAMPLES}")
    return scheme


def open_storage(
    url: str = DEFAULT_STORAGE,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    heartbeat_stale_trial_callback: Callable | None = None,
) -> RDBStorage:
    """Open the Optuna RDB storage at ``url``, creating its tables when they do not exist.

    With ``heartbeat_interval`` (seconds), running trials record heartbeats.
    A trial silent for ``grace_period`` seconds (default: twice the
    interval) counts as stale, and ``heartbeat_stale_trial_callback`` is
    then called for it. Raises ConfigError for an unsupported URL and UserError
    naming the URL (without its password) when the database cannot be opened.
    """
    import sqlalchemy.exc

    scheme = storage_scheme(url)
    engine_kwargs: dict = {}
    if scheme == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_LOCK_TIMEOUT_S}
    else:
        # A worker that idles while a long configuration trains must not reuse a connection the server closed.
        engine_kwargs["pool_pre_ping"] = True

    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():
                # Optuna marks heartbeat_interval as experimental; the warning would repeat on every worker.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Another worker created a table or type between Optuna's check and its CREATE statement.
            if attempt == CREATE_ATTEMPTS:
                raise _open_error(url, error) from error
            logger.info("creating Optuna's tables in %s collided with another worker (%s); trying again", redact_url(url), type(error).__name__)
            time.sleep(CREATE_RETRY_S)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
            raise _open_error(url, error) from error
    raise AssertionError("unreachable: the last attempt returns or raises")


def _open_error(url: str, error: Exception) -> UserError:
    reason = str(error).splitlines()[0]
    return UserError(
        f"Optuna storage {redact_url(url)} cannot be opened ({reason}); check that the database server runs "
        f"and the URL, user and password are right, e.g. {STORAGE_EXAMPLES}"
    )


def create_or_load_study(
    name: str,
    storage: RDBStorage,
    direction: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool]:
    """Return the study ``name`` and True when this call created it, False when it existed.

    Raises UserError when an existing study of that name optimizes in the
    other direction, because it then belongs to something else.
    """
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler, pruner=pruner)
        logger.info("created Optuna study %s", name)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)

    expected = optuna.study.StudyDirection.MAXIMIZE if direction == "maximize" else optuna.study.StudyDirection.MINIMIZE
    if study.directions != [expected]:
        raise UserError(
            f"Optuna study {name} exists with direction {study.directions[0].name.lower()}, not {direction}; "
            "it belongs to something else, pass another --study-name"
        )
    logger.info("joined Optuna study %s with %d trials", name, len(study.get_trials(deepcopy=False)))
    return study, False


def shared_setup(
    study: optuna.Study,
    created: bool,
    attribute: str,
    setup: Callable[[], str],
    timeout_s: float = SETUP_TIMEOUT_S,
    poll_s: float = SETUP_POLL_S,
) -> str:
    """Run ``setup`` once per study and return its result, which is stored as the study user attribute ``attribute``.

    The worker that created the study runs ``setup``. Other workers return
    the stored value, waiting up to ``timeout_s`` for it. When the creator
    died before storing it, the waiting worker runs ``setup`` itself, so
    ``setup`` must be safe to run twice (find-or-create).
    """
    if created:
        value = setup()
        study.set_user_attr(attribute, value)
        return value

    deadline = time.monotonic() + timeout_s
    while True:
        value = study.user_attrs.get(attribute)
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)

    logger.warning(
        "Optuna study %s has no %s after %.0f s; the worker that created it has probably stopped, so this worker sets it up",
        study.study_name, attribute, timeout_s,
    )
    value = setup()
    study.set_user_attr(attribute, value)
    return value
