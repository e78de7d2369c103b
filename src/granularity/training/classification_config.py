"""The configuration of one classification run: defaults, allowed values and validation.

The keys are the ``classify`` parameters with underscores. The CLI, the
MLproject entry point and the study runner all pass a dict with these keys
to :func:`granularity.training.classification.run_classification`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from granularity.data.granularity import GRANULARITIES
from granularity.errors import ConfigError
from granularity.models.classifiers import CLASSIFIERS
from granularity.tracking.uri import DEFAULT_EXPERIMENT

OPTIMIZERS = ("adam", "nadam", "sgd")
SPLITS = ("region", "patch")
AUGMENTATIONS = ("study", "none")
DEVICES = ("auto", "cpu", "cuda")

# Train, validation and test shares of the regions (or of the windows with split=patch).
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

CLASSIFICATION_DEFAULTS: dict[str, Any] = {
    "dataset": None,
    "format": "auto",
    "class_map": None,
    "granularity": "pw",
    "patch_size": 64,
    "model": "resnet18",
    "pretrained": "imagenet",
    "epochs": 10,
    "batch_size": 64,
    "lr": 0.001,
    "optimizer": "adam",
    "seed": 0,
    "split": "region",
    "max_patches_per_class": 0,
    "augment": "study",
    "input_size": 128,
    "early_stopping": 0,
    "device": "auto",
    "num_workers": -1,
    "experiment": DEFAULT_EXPERIMENT,
}

_CHOICES = {
    "granularity": GRANULARITIES,
    "model": tuple(CLASSIFIERS),
    "optimizer": OPTIMIZERS,
    "split": SPLITS,
    "augment": AUGMENTATIONS,
}

_INTEGERS_AT_LEAST = {
    "patch_size": 1,
    "epochs": 1,
    "batch_size": 1,
    "seed": 0,
    "max_patches_per_class": 0,
    "input_size": 16,
    "early_stopping": 0,
    "num_workers": -1,
}


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ConfigError(f"{key} {value!r} is invalid; use a whole number")


def resolve_classification_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` completed with defaults, with values converted to their types and checked.

    Raises ConfigError naming the key, the value and the allowed values.
    Unknown keys are rejected, so a typo does not pass silently.
    """
    unknown = sorted(set(config) - set(CLASSIFICATION_DEFAULTS) - {"cache_dir"})
    if unknown:
        raise ConfigError(f"unknown classification options {unknown}; valid options are {sorted(CLASSIFICATION_DEFAULTS)}")

    resolved = dict(CLASSIFICATION_DEFAULTS)
    resolved.update({key: value for key, value in config.items() if value is not None})

    for key in ("dataset", "class_map"):
        if not resolved.get(key):
            raise ConfigError(f"the option {key} is required; pass --{key.replace('_', '-')}")
        resolved[key] = str(resolved[key])

    for key, choices in _CHOICES.items():
        value = str(resolved[key]).strip().lower()
        if value not in choices:
            raise ConfigError(f"{key} {resolved[key]!r} is invalid; use one of {', '.join(choices)}")
        resolved[key] = value

    for key, minimum in _INTEGERS_AT_LEAST.items():
        number = _as_int(key, resolved[key])
        if number < minimum:
            raise ConfigError(f"{key} {number} is invalid; use a whole number of at least {minimum}")
        resolved[key] = number

    try:
        resolved["lr"] = float(resolved["lr"])
    except (TypeError, ValueError):
        raise ConfigError(f"lr {resolved['lr']!r} is invalid; use a positive number such as 0.001") from None
    if not resolved["lr"] > 0:
        raise ConfigError(f"lr {resolved['lr']} is invalid; use a positive number such as 0.001")

    device = str(resolved["device"]).strip().lower()
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"device {resolved['device']!r} is invalid; use one of {', '.join(DEVICES)} or cuda:N")
    resolved["device"] = device

    resolved["format"] = str(resolved["format"]).strip().lower()
    resolved["pretrained"] = str(resolved["pretrained"]).strip()
    if resolved["pretrained"].lower() in ("imagenet", "none"):
        resolved["pretrained"] = resolved["pretrained"].lower()
    resolved["experiment"] = str(resolved["experiment"])
    return resolved
