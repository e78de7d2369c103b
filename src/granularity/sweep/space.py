"""Search spaces of ``granularity sweep``: a YAML file naming the task options to tune and their ranges.

A space file looks like this (``mlproject/sweeps/classify.yaml`` is a full one)::

    task: classify                  # optional; must match --task when given
    parameters:
      lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      batch_size: {type: categorical, choices: [32, 64, 128]}
      epochs: {type: int, low: 2, high: 8, step: 2}

Types and their keys, as Optuna's ``suggest_float``, ``suggest_int`` and
``suggest_categorical`` take them:

- ``float``: ``low``, ``high``, optional ``log`` (bool) or ``step``;
- ``int``: ``low``, ``high`` (whole numbers), optional ``log`` or ``step``;
- ``categorical``: ``choices``, a non-empty list of strings, numbers or booleans.

Every parameter must be an option of the task. Options that locate the data
or only change where a run executes (and ``seed``, because tuning the seed
fits the split) cannot be swept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from granularity.errors import ConfigError

TASK_ALIASES = {
    "classify": "classification",
    "classification": "classification",
    "segment": "segmentation",
    "segmentation": "segmentation",
}
PARAMETER_TYPES = ("float", "int", "categorical")
RANGE_KEYS = frozenset({"type", "low", "high", "log", "step"})
CATEGORICAL_KEYS = frozenset({"type", "choices"})
TOP_LEVEL_KEYS = frozenset({"task", "description", "parameters"})

# Options that locate the data or change only where a run executes; sweeping the seed would tune the split.
NOT_SWEEPABLE = frozenset({"dataset", "format", "class_map", "experiment", "device", "num_workers", "cache_dir", "seed"})


def task_defaults(task: str) -> Mapping[str, Any]:
    """Return the option defaults of ``task`` (classification or segmentation)."""
    if task == "classification":
        from granularity.training.classification_config import CLASSIFICATION_DEFAULTS

        return CLASSIFICATION_DEFAULTS

    from granularity.training.segmentation import DEFAULTS

    return DEFAULTS


def sweepable_options(task: str) -> list[str]:
    """Return the names of the options of ``task`` that a search space may tune, sorted."""
    return sorted(set(task_defaults(task)) - NOT_SWEEPABLE)


def canonical_task(name: str, source: str = "--task") -> str:
    """Return ``classification`` or ``segmentation`` for a task name or alias; raise ConfigError otherwise."""
    task = TASK_ALIASES.get(str(name).strip().lower())
    if task is None:
        raise ConfigError(f"{source}: task {name!r} is invalid; use classify or segment")
    return task


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SearchParameter:
    """One tuned option: its name, type and range (``low``/``high``/``log``/``step``) or ``choices``."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """Return the value ``trial`` suggests for this parameter."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def corner_values(self) -> list[Any]:
        """Return the values at the edges of the range, or every choice, for checking them before a sweep starts."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]

    def as_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        data = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            data["step"] = self.step
        return data


@dataclass(frozen=True)
class SearchSpace:
    """The tuned options of one task, in file order; ``source`` names the file for messages."""

    task: str
    parameters: tuple[SearchParameter, ...]
    source: str = "<space>"
    description: str = ""
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(parameter.name for parameter in self.parameters))

    def suggest(self, trial) -> dict[str, Any]:
        """Return one value per parameter, as suggested by ``trial``."""
        return {parameter.name: parameter.suggest(trial) for parameter in self.parameters}

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "parameters": {parameter.name: parameter.as_dict() for parameter in self.parameters}}


def _range_parameter(name: str, spec: Mapping[str, Any], kind: str, where: str) -> SearchParameter:
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} for type {kind}; valid keys are {sorted(RANGE_KEYS)}")
    missing = [key for key in ("low", "high") if key not in spec]
    if missing:
        raise ConfigError(f"{where}: {' and '.join(missing)} missing; give both low and high, e.g. {{type: {kind}, low: 1, high: 10}}")

    low, high = spec["low"], spec["high"]
    for key, value in (("low", low), ("high", high)):
        if not _is_number(value):
            raise ConfigError(f"{where}: {key} {value!r} is invalid; use a finite number (write 1.0e-5, not 1e-5, so YAML reads a number)")
        if kind == "int" and not float(value).is_integer():
            raise ConfigError(f"{where}: {key} {value!r} is invalid for type int; use a whole number or type float")
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be less than high {high}; swap them or widen the range")

    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log {log!r} is invalid; use true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got low {low}; raise low or set log: false")

    step = spec.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise ConfigError(f"{where}: step {step!r} is invalid; use a positive number")
        if kind == "int" and not float(step).is_integer():
            raise ConfigError(f"{where}: step {step!r} is invalid for type int; use a whole number")
        if log:
            raise ConfigError(f"{where}: step and log: true cannot be combined; remove one of them")

    if kind == "int":
        return SearchParameter(name, kind, int(low), int(high), log, None if step is None else int(step))
    return SearchParameter(name, kind, float(low), float(high), log, None if step is None else float(step))


def _categorical_parameter(name: str, spec: Mapping[str, Any], where: str) -> SearchParameter:
    unknown = sorted(set(spec) - CATEGORICAL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} for type categorical; valid keys are {sorted(CATEGORICAL_KEYS)}")
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: choices {choices!r} is invalid; use a non-empty list, e.g. choices: [32, 64]")
    invalid = [choice for choice in choices if choice is not None and not isinstance(choice, (str, int, float, bool))]
    if invalid:
        raise ConfigError(f"{where}: choices {invalid} are invalid; use strings, numbers or booleans")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}: choices {choices} repeat a value; list each value once")
    return SearchParameter(name, "categorical", choices=tuple(choices))


def parse_space(data: Any, task: str, source: str = "<space>") -> SearchSpace:
    """Check a loaded space file for ``task`` and return it; raise ConfigError naming the file, parameter and fix."""
    task = canonical_task(task)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a search space must be a YAML mapping with a 'parameters' section")
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(TOP_LEVEL_KEYS)}")
    if data.get("task") is not None and canonical_task(data["task"], source) != task:
        raise ConfigError(f"{source}: the space is for task {data['task']}, but the sweep's task is {task}; pass a {task} space with --space")

    parameters = data.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise ConfigError(f"{source}: 'parameters' must map at least one option name to its range")

    allowed = sweepable_options(task)
    invalid_names = sorted(str(name) for name in parameters if name not in allowed)
    if invalid_names:
        raise ConfigError(f"{source}: unknown parameters {invalid_names} for {task}; sweepable options are {allowed}")

    result = []
    for name, spec in parameters.items():
        where = f"{source}: parameter {name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: {spec!r} is invalid; use a mapping such as {{type: float, low: 1.0e-4, high: 1.0e-2}}")
        kind = spec.get("type")
        if kind not in PARAMETER_TYPES:
            raise ConfigError(f"{where}: unknown type {kind!r}; use one of {', '.join(PARAMETER_TYPES)}")
        if kind == "categorical":
            result.append(_categorical_parameter(name, spec, where))
        else:
            result.append(_range_parameter(name, spec, kind, where))
    return SearchSpace(task=task, parameters=tuple(result), source=source, description=str(data.get("description") or ""))


def load_space(path: str | Path, task: str) -> SearchSpace:
    """Load and check the search-space YAML file at ``path`` for ``task``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} not found; pass an existing YAML file with --space")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error}); fix the syntax") from None
    return parse_space(data, task, str(path))


SPACE_FOLDER = Path("mlproject") / "sweeps"
SPACE_FILES = {"classification": "classify.yaml", "segmentation": "segment.yaml"}


def default_space_path(task: str) -> Path:
    """Return the shipped space of ``task``: ``mlproject/sweeps/<task>.yaml`` in the working directory, else in the project."""
    from granularity.study.preset import PROJECT_ROOT

    name = SPACE_FILES[canonical_task(task)]
    for folder in (Path.cwd() / SPACE_FOLDER, PROJECT_ROOT / SPACE_FOLDER):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"no search space {SPACE_FOLDER / name} found; pass one with --space FILE")
