"""Study presets: YAML files that name the dataset, the grid of each task and the seeds.

A preset looks like this (``mlproject/studies/quick.yaml`` is a full one)::

    name: quick
    dataset:
      path: ${DATA_ROOT}/consep-256     # environment variables are expanded
      format: consep
      class_map: ../class_maps/consep.yaml   # relative paths: to the preset file
    classification:
      seeds: 2                          # a count (seeds 0..N-1) or a list
      grid: {model: [mobilenet], granularity: [pw, el, bd], patch_size: [32]}
      params: {pretrained: none, epochs: 1}
    segmentation:
      seeds: 1
      grid: {model: [linknet], granularity: [pw, el, bd]}
      params: {pretrained: none, epochs: 1, max_regions: 40}

``DATA_ROOT`` defaults to ``../shared/datasets`` where that folder exists
(seen from the working directory), else ``data``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from granularity.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[3]
PRESET_FOLDER = Path("mlproject") / "studies"
TASKS = ("classification", "segmentation")
SECTION_KEYS = {"seeds", "grid", "params"}
TOP_LEVEL_KEYS = {"name", "description", "dataset", "seeds", *TASKS}
DATASET_KEYS = {"path", "format", "class_map"}
GRANULARITIES = ("pw", "el", "bd")

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class TaskGrid:
    """One task's part of a preset: the seeds, the swept options (name -> values) and the fixed options."""

    seeds: list[int]
    grid: dict[str, list[Any]]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Preset:
    """A loaded preset with paths resolved; ``source`` is the file it came from."""

    name: str
    description: str
    dataset: dict[str, str]
    tasks: dict[str, TaskGrid]
    source: Path

    def as_dict(self, with_seeds: bool = True) -> dict[str, Any]:
        """Return the preset as plain data; without seeds it identifies the study whatever ``--seeds`` says."""
        tasks = {}
        for task, grid in self.tasks.items():
            tasks[task] = {"grid": grid.grid, "params": grid.params}
            if with_seeds:
                tasks[task]["seeds"] = grid.seeds
        return {"name": self.name, "dataset": self.dataset, **tasks}


def default_data_root() -> str:
    """Return ``DATA_ROOT`` if set, else ``../shared/datasets`` where it exists, else ``data``."""
    if os.environ.get("DATA_ROOT"):
        return os.environ["DATA_ROOT"]
    shared = Path("..") / "shared" / "datasets"
    return str(shared) if shared.is_dir() else "data"


def expand_variables(text: str, source: Path) -> str:
    """Replace ``${NAME}`` with the environment variable; ``DATA_ROOT`` has a default, other names must be set."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name == "DATA_ROOT":
            return default_data_root()
        if name not in os.environ:
            raise ConfigError(f"{source}: variable ${{{name}}} is not set; export {name} or write the value into the preset")
        return os.environ[name]

    return _VARIABLE.sub(replace, text)


def find_preset(name_or_file: str | Path) -> Path:
    """Return the preset file for a name (``quick`` -> ``mlproject/studies/quick.yaml``) or a path."""
    candidate = Path(name_or_file)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"preset file {candidate} not found; pass an existing YAML file or a preset name")
        return candidate

    folders = [Path.cwd() / PRESET_FOLDER, PROJECT_ROOT / PRESET_FOLDER]
    for folder in folders:
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name_or_file}{suffix}"
            if path.is_file():
                return path
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.y*ml")})
    raise ConfigError(f"preset {str(name_or_file)!r} not found in {PRESET_FOLDER}; use one of {known} or a path to a YAML file")


def _seeds(value, source: Path, where: str) -> list[int]:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{source}: {where}.seeds is {value!r}; use a count such as 3 or a list such as [0, 1, 2]")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{source}: {where}.seeds is {value}; use a count of 1 or more")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{source}: {where}.seeds {value} repeats a seed; list each seed once")
        return list(value)
    raise ConfigError(f"{source}: {where}.seeds is {value!r}; use a count such as 3 or a list of integers")


def _resolve_path(value: str, source: Path) -> str:
    path = Path(value).expanduser()
    # Class maps sit beside the presets in the repository, so relative paths are read from the preset's folder.
    return str(path if path.is_absolute() else (source.parent / path).resolve())


def _task_grid(task: str, section, default_seeds, source: Path) -> TaskGrid:
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: section {task!r} must be a mapping with 'grid' and 'params'")
    unknown = sorted(set(section) - SECTION_KEYS)
    if unknown:
        raise ConfigError(f"{source}: section {task!r} has unknown keys {unknown}; valid keys are {sorted(SECTION_KEYS)}")

    grid = section.get("grid") or {}
    if not isinstance(grid, dict) or "model" not in grid or "granularity" not in grid:
        raise ConfigError(f"{source}: {task}.grid must list at least 'model' and 'granularity'")
    grid = {key: value if isinstance(value, list) else [value] for key, value in grid.items()}
    if any(not values for values in grid.values()):
        raise ConfigError(f"{source}: {task}.grid has an empty list; give every swept option at least one value")
    invalid = sorted(set(grid["granularity"]) - set(GRANULARITIES))
    if invalid:
        raise ConfigError(f"{source}: {task}.grid.granularity has invalid values {invalid}; use pw, el and bd")
    if task == "classification" and "patch_size" not in grid and "patch_size" not in (section.get("params") or {}):
        raise ConfigError(f"{source}: classification needs patch_size in its grid or params, e.g. patch_size: [32, 64, 128]")

    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {task}.params must be a mapping of option names to values")
    overlap = sorted(set(params) & set(grid))
    if overlap or "seed" in params or "seed" in grid:
        raise ConfigError(f"{source}: {task} sets {overlap or ['seed']} in more than one place; seeds go under 'seeds', swept options under 'grid'")

    seeds = _seeds(section.get("seeds", default_seeds), source, task)
    return TaskGrid(seeds=seeds, grid=grid, params=params)


def load_preset(name_or_file: str | Path) -> Preset:
    """Load and check a preset by name or path; raise ConfigError naming the file, the value and the fix."""
    source = find_preset(name_or_file)
    try:
        data = yaml.safe_load(expand_variables(source.read_text(encoding="utf-8"), source))
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML ({error}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a preset must be a YAML mapping with 'name', 'dataset' and task sections")

    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(TOP_LEVEL_KEYS)}")
    dataset = data.get("dataset")
    if not isinstance(dataset, dict) or set(dataset) != DATASET_KEYS:
        raise ConfigError(f"{source}: 'dataset' must have exactly the keys {sorted(DATASET_KEYS)}")
    dataset = {
        # The dataset path is read from the working directory, as DATA_ROOT is, and stored absolute so runs started elsewhere find it.
        "path": str(Path(str(dataset["path"])).expanduser().resolve()),
        "format": str(dataset["format"]),
        "class_map": _resolve_path(str(dataset["class_map"]), source),
    }

    tasks = {task: _task_grid(task, data[task], data.get("seeds", 1), source) for task in TASKS if data.get(task) is not None}
    if not tasks:
        raise ConfigError(f"{source}: the preset has neither a 'classification' nor a 'segmentation' section; add one")
    return Preset(
        name=str(data.get("name") or source.stem),
        description=str(data.get("description") or ""),
        dataset=dataset,
        tasks=tasks,
        source=source,
    )
