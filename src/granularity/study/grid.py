"""Expand a preset into the list of run configurations: every combination of the grid, for every seed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from granularity.study.preset import Preset
from granularity.tracking.keys import config_key


@dataclass(frozen=True)
class StudyConfiguration:
    """One child run of a study: its task, the configuration passed to the task, and that configuration's key."""

    task: str
    config: dict[str, Any]
    key: str

    def describe(self) -> str:
        parts = [self.task, str(self.config.get("model")), str(self.config.get("granularity"))]
        if "patch_size" in self.config:
            parts.append(f"patch {self.config['patch_size']}")
        parts.append(f"seed {self.config.get('seed')}")
        return " ".join(parts)


def expand_grid(preset: Preset, seeds: int | None = None, experiment: str | None = None) -> list[StudyConfiguration]:
    """Return one configuration per task, grid combination and seed, in a stable order.

    ``seeds`` overrides every task's seeds with 0..seeds-1. ``experiment`` is
    put into each configuration as an execution option, so it does not change
    the configuration key.
    """
    configurations = []
    for task, task_grid in preset.tasks.items():
        task_seeds = list(range(seeds)) if seeds is not None else task_grid.seeds
        names = list(task_grid.grid)
        for values in itertools.product(*(task_grid.grid[name] for name in names)):
            for seed in task_seeds:
                config = {"dataset": preset.dataset["path"], "format": preset.dataset["format"], "class_map": preset.dataset["class_map"]}
                config.update(task_grid.params)
                config.update(zip(names, values))
                config["seed"] = seed
                if experiment:
                    config["experiment"] = experiment
                configurations.append(StudyConfiguration(task=task, config=config, key=config_key(config)))
    return configurations
