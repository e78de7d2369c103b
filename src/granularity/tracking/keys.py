"""Stable keys and tag names shared by every task and by ``compare``."""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

# Tag names that every training run sets; compare and study search by them.
TAG_TASK = "task"
TAG_GRANULARITY = "granularity"
TAG_MODEL = "model"
TAG_PATCH_SIZE = "patch_size"
TAG_DATASET = "dataset"
TAG_DATASET_DIGEST = "dataset_digest"
TAG_GIT_COMMIT = "git_commit"
TAG_CONFIG_KEY = "config_key"
TAG_STUDY = "study"
TAG_SEED = "seed"

# Options that change where or how fast a run executes but not what it computes.
EXECUTION_OPTIONS = frozenset({"device", "num_workers", "resume", "experiment", "log_level", "cache_dir"})


def config_key(config: Mapping) -> str:
    """Return a 16-hex-digit hash of a run configuration.

    Execution options (device, loader workers, resume) are left out, so a
    configuration run on the CPU and on CUDA has one key. Values are compared
    as JSON, so 0.001 and 1e-3 give the same key but "0.001" does not.
    """
    relevant = {key: value for key, value in config.items() if key not in EXECUTION_OPTIONS}
    text = json.dumps(relevant, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
