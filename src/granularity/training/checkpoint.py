"""Training checkpoints: model, optimizer, epoch, best metric and random states, written atomically.

A checkpoint is one ``torch.save`` file holding a plain dict:

- ``model``: the model's state dict; ``optimizer`` and ``scaler`` (or None):
  their state dicts.
- ``epoch``: the last completed epoch (1-based); ``best_metric``,
  ``best_epoch`` and ``epochs_without_improvement``: the model-selection state.
- ``random_states``: Python, NumPy, torch CPU and CUDA generator states, and
  the state of the training loader's generator, so a resumed run draws the
  same shuffles and augmentations as an uninterrupted one.
- ``extra``: a dict the task may fill (for example the class names).

``best.pt`` contains only ``model``, ``epoch``, ``best_metric`` and ``extra``.
The file is written to a temporary name in the same folder and renamed, so a
crash or Ctrl-C while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from granularity.errors import UserError

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_ARTIFACT_DIR = "checkpoints"

# Checkpoints stay on local disk under checkpoints/<run id>/ in the working directory, so a run whose
# tracking server went away keeps every finished epoch.
CHECKPOINT_ROOT = Path("checkpoints")


def capture_random_states(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Return the states of every random generator a training epoch draws from."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    return states


def restore_random_states(states: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore the generator states saved by :func:`capture_random_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])

    # A checkpoint written on a CUDA machine may be resumed on a CPU-only one, and vice versa.
    if states.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = states["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
    if states.get("loader") is not None and loader_generator is not None:
        loader_generator.set_state(states["loader"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises UserError naming the file when it is missing or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; resume a run whose first epoch finished, or start a new run")

    # weights_only=False because the random states hold NumPy arrays and tuples; only our own files are read here.
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"checkpoint {path} cannot be read ({error}); delete it and start a new run") from error

    missing = [key for key in ("model", "epoch") if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path} is not a training checkpoint (missing {missing}); pass a file written by granularity")
    return state


def local_checkpoints(run_id: str, checkpoint_dir: Path) -> Path:
    """Return the ``last.pt`` to resume ``run_id`` from, downloading the run's checkpoints when they are not on this disk.

    ``best.pt`` is required too, because when no later epoch improves the loop keeps the earlier best.
    """
    last = checkpoint_dir / LAST_CHECKPOINT
    if last.is_file() and (checkpoint_dir / BEST_CHECKPOINT).is_file():
        return last

    import mlflow
    from mlflow.exceptions import MlflowException

    logger.info("checkpoints of run %s not in %s; downloading them from the tracking server", run_id, checkpoint_dir)
    try:
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT_DIR, dst_path=str(checkpoint_dir.parent / f".{run_id}-download")
            )
        )
    except (MlflowException, OSError) as error:
        raise UserError(f"run {run_id} has no checkpoint to resume from ({error}); its first epoch never finished, start a new run") from error

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        if not (downloaded / name).is_file():
            raise UserError(f"run {run_id} has no {CHECKPOINT_ARTIFACT_DIR}/{name} artifact; its first epoch never finished, start a new run")
        (downloaded / name).replace(checkpoint_dir / name)
    return last
