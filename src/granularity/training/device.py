"""Device selection, seeding and data-loader settings shared by every training task."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from granularity.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` picks CUDA when present, else the CPU. Raises ConfigError when
    CUDA is requested but absent.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return device
    raise ConfigError(f"invalid device {name!r}; use one of {', '.join(DEVICES)} (or cuda:N)")


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed Python, NumPy and torch, and make CPU runs repeatable.

    On the CPU, deterministic algorithms are enforced, so one seed gives the
    same metrics. On CUDA, cuDNN autotuning stays on for speed, so CUDA
    runs with one seed may differ in the last digits.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a loader worker from the seed torch gave that worker.

    torch seeds each worker from the loader's generator, so augmentations
    drawn with NumPy or ``random`` repeat with the run's seed.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def loader_options(device: torch.device, num_workers: int, seed: int) -> dict:
    """Return DataLoader keyword arguments for ``device``: workers, pinned memory and a seeded generator."""
    if num_workers < 0:
        raise ConfigError(f"invalid num_workers {num_workers}; use 0 (load in the main process) or a positive count")

    generator = torch.Generator()
    generator.manual_seed(seed)
    options = {
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda",
        "generator": generator,
        "worker_init_fn": seed_worker,
    }
    if num_workers > 0:
        options["persistent_workers"] = True
        options["prefetch_factor"] = 4
    return options


def default_num_workers(device: torch.device) -> int:
    """Return a loader worker count: up to 8 on CUDA, none on the CPU where workers compete with training."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))
