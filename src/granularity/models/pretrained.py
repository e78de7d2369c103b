"""Pretrained-weight lookup in local caches only, and loading weights into a model with a new head.

``pretrained`` is ``imagenet``, ``none`` or the path of a weight file.
``imagenet`` looks, in this order, in the torch hub cache
(``torch.hub.get_dir()/checkpoints/<torchvision file name>``, moved by
``TORCH_HOME``) and in the Hugging Face hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) under the timm repository
id. The lookup never opens a network connection, so an offline machine
without the file fails at once with a message naming the files it looked for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from granularity.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

PRETRAINED_CHOICES = ("imagenet", "none")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class WeightSource:
    """Where the ImageNet weights of one architecture live in the local caches.

    Attributes:
        hub_file: file name in the torch hub ``checkpoints`` folder, as torchvision downloads it.
        hf_repo: Hugging Face repository id, as timm downloads it.
        download_hint: a Python line that fills the cache on a machine with internet access.
    """

    hub_file: str | None = None
    hf_repo: str | None = None
    download_hint: str = ""


def torch_hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """Return the Hugging Face hub cache folder, read from the environment at call time.

    huggingface_hub reads these variables once at import, so a later change
    (a test, a notebook) would be missed by its own constant.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "huggingface" / "hub"


def _hf_cached_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    # try_to_load_from_cache reads only the cache folder and never the network.
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_hub_cache_dir()))
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def find_imagenet_weights(model_name: str, source: WeightSource) -> Path:
    """Return the cached ImageNet weight file of ``model_name``.

    Raises UserError naming every place looked at, the download command and
    the ``none`` option when no cache contains the file.
    """
    looked_at: list[str] = []

    if source.hub_file:
        hub_path = torch_hub_checkpoints_dir() / source.hub_file
        if hub_path.is_file():
            return hub_path
        looked_at.append(str(hub_path))

    if source.hf_repo:
        for filename in HF_WEIGHT_FILES:
            cached = _hf_cached_file(source.hf_repo, filename)
            if cached is not None:
                return cached
        looked_at.append(f"{source.hf_repo}/{{{','.join(HF_WEIGHT_FILES)}}} in the Hugging Face cache {hf_hub_cache_dir()}")

    hint = f" Fill the cache on a machine with internet access ({source.download_hint})," if source.download_hint else ""
    raise UserError(
        f"ImageNet weights for {model_name} not found in the local caches: looked for {' and '.join(looked_at)}."
        f"{hint} pass --pretrained PATH to a weight file, or --pretrained none to train from scratch"
    )


def resolve_pretrained(pretrained: str | None, model_name: str, source: WeightSource) -> Path | None:
    """Return the weight file that ``pretrained`` names, or None for ``none``."""
    value = "none" if pretrained is None else str(pretrained).strip()
    if value.lower() in ("none", ""):
        return None
    if value.lower() == "imagenet":
        return find_imagenet_weights(model_name, source)

    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"weight file {path} not found; pass --pretrained imagenet, none, or the path of an existing weight file")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file.

    A torch file may hold the state dict itself or a checkpoint dict with it
    under ``model`` or ``state_dict``. A ``module.`` prefix left by
    DataParallel is removed.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise several unrelated types for a damaged file
        raise UserError(f"weight file {path} cannot be read ({type(error).__name__}: {error}); pass a torch or safetensors state dict") from error

    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"weight file {path} does not hold a state dict of tensors; pass a torch or safetensors state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights_with_new_head(model: nn.Module, state: dict[str, torch.Tensor], head: str, path: str | Path) -> bool:
    """Load ``state`` into ``model`` except a head of another shape; return whether the head was loaded.

    Every parameter outside ``head`` (a module path such as ``fc`` or
    ``classifier.6``) must be present with its shape; the head keeps its fresh
    initialisation unless the file contains a head of the same shape (a model
    fine-tuned on the same classes). Raises UserError naming the file when
    the backbone does not fit.
    """
    expected = model.state_dict()
    head_prefix = head + "."
    head_keys = [key for key in expected if key.startswith(head_prefix)]
    head_fits = all(key in state and state[key].shape == expected[key].shape for key in head_keys)

    backbone = {key: value for key, value in state.items() if not key.startswith(head_prefix)}
    # Older torchvision weight files predate BatchNorm's num_batches_tracked buffer; BatchNorm fills it in.
    missing = [
        key
        for key in expected
        if not key.startswith(head_prefix) and key not in backbone and not key.endswith("num_batches_tracked")
    ]
    unexpected = [key for key in backbone if key not in expected]
    mismatched = [key for key in backbone if key in expected and backbone[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise UserError(f"weight file {path} does not fit this architecture: {details}; pass weights of the same model or --pretrained none")

    to_load = dict(backbone)
    if head_fits:
        to_load.update({key: state[key] for key in head_keys})
    model.load_state_dict(to_load, strict=False)
    return head_fits
