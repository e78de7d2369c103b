"""Class balancing: the same number of patches for every class, drawn with a seed."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from granularity.errors import UserError

logger = logging.getLogger(__name__)


class EmptyClassError(UserError):
    """A class has no patch, so the classes cannot be balanced."""


def balance_classes(
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    max_per_class: int = 0,
    class_names: Sequence[str] | None = None,
    allow_missing: bool = False,
) -> np.ndarray:
    """Draw the same number of patches from every class, without replacement.

    The count per class is the smallest class count, capped at
    ``max_per_class`` when that is above 0.

    Args:
        labels: class index of every patch.
        num_classes: number of classes in the class map.
        seed: seed of the draw; the same seed gives the same indices.
        max_per_class: upper bound on the patches per class; 0 means no bound.
        class_names: names used in the error message; class indices otherwise.
        allow_missing: balance over the classes that have patches and log a
            warning, instead of raising, when a class has none.

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        EmptyClassError: a class has no patch and ``allow_missing`` is False.
        ValueError: a label lies outside 0 .. num_classes - 1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"patch label {bad} is outside the {num_classes} classes 0..{num_classes - 1}")
    if max_per_class < 0:
        raise ValueError(f"max_per_class {max_per_class} is negative; use 0 for no bound")

    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    counts = np.bincount(labels, minlength=num_classes)
    per_class = ", ".join(f"{names[i]} {counts[i]}" for i in range(num_classes))
    empty = [names[i] for i in range(num_classes) if counts[i] == 0]
    if empty and not allow_missing:
        raise EmptyClassError(
            f"cannot balance classes: {', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no patches "
            f"(patches per class: {per_class}); use another patch size or granularity, add data, or drop the class from the class map"
        )
    if empty:
        logger.warning("balancing without empty classes %s (patches per class: %s)", ", ".join(empty), per_class)

    present = [i for i in range(num_classes) if counts[i] > 0]
    if not present:
        return np.zeros(0, dtype=np.int64)
    target = int(min(counts[i] for i in present))
    if max_per_class > 0:
        target = min(target, max_per_class)

    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == i), size=target, replace=False) for i in present]
    logger.debug("balanced %d patches to %d per class (patches per class: %s)", labels.size, target, per_class)
    return np.sort(np.concatenate(chosen)).astype(np.int64)
