"""Train, validation and test splits: by region group (default) or over patches.

Splitting by group keeps every region of one slide or tile in one subset,
because overlapping neighbouring patches in train and test would leak. The
split over patches reproduces the original study's protocol for comparison.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from granularity.errors import ConfigError

logger = logging.getLogger(__name__)

SUBSETS = ("train", "val", "test")


class InvalidFractionsError(ConfigError, ValueError):
    """Split fractions that are not three non-negative numbers summing to 1."""


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Return the (train, val, test) fractions as floats after checking them.

    Raises:
        InvalidFractionsError: not three numbers, a negative one, a zero
            train fraction, or a sum other than 1 (within 1e-6).
    """
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as error:
        raise InvalidFractionsError(f"split fractions {fractions!r} are invalid; give three numbers such as (0.8, 0.1, 0.1)") from error
    if len(values) != 3:
        raise InvalidFractionsError(f"split fractions {fractions!r} are invalid; give exactly three numbers (train, val, test) such as (0.8, 0.1, 0.1)")
    if any(not np.isfinite(v) or v < 0 for v in values) or values[0] == 0:
        raise InvalidFractionsError(f"split fractions {fractions!r} are invalid; every fraction must be >= 0 and the train fraction > 0")
    if abs(sum(values) - 1.0) > 1e-6:
        raise InvalidFractionsError(f"split fractions {fractions!r} sum to {sum(values):g}; they must sum to 1, such as (0.8, 0.1, 0.1)")
    return values  # type: ignore[return-value]


def split_by_group(groups: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[int]]:
    """Split regions into train, val and test so that no group lands in two subsets.

    The groups are shuffled with ``seed`` and laid end to end, each as long as
    its number of regions. A group goes to the subset in which its midpoint
    falls, so the subsets approach ``fractions`` of the regions. With at least
    as many groups as subsets of non-zero fraction, no such subset is empty.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, sorted region indices.
    """
    fractions = check_fractions(fractions)
    names = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]

    members: dict[str, list[int]] = {name: [] for name in names}
    for index, group in enumerate(groups):
        members[group].append(index)

    # Assign each group by the position of its midpoint on the cumulative region count.
    bounds = np.cumsum(fractions) * len(groups)
    assignment: dict[str, int] = {}
    position = 0
    for name in order:
        size = len(members[name])
        midpoint = position + size / 2.0
        assignment[name] = min(int(np.searchsorted(bounds, midpoint, side="right")), 2)
        position += size

    _fill_empty_subsets(assignment, order, fractions)

    split = {subset: [] for subset in SUBSETS}
    for name, subset_index in assignment.items():
        split[SUBSETS[subset_index]].extend(members[name])
    for subset in SUBSETS:
        split[subset].sort()
    logger.debug(
        "split %d regions of %d groups: %s",
        len(groups), len(names), ", ".join(f"{s} {len(split[s])}" for s in SUBSETS),
    )
    return split


def _fill_empty_subsets(assignment: dict[str, int], order: list[str], fractions: tuple[float, float, float]) -> None:
    """Move one group into every empty subset of non-zero fraction, taken from the subset with the most groups."""
    required = [i for i in range(3) if fractions[i] > 0]
    if len(order) < len(required):
        return
    for subset_index in required:
        if subset_index in assignment.values():
            continue
        counts = [sum(1 for s in assignment.values() if s == i) for i in range(3)]
        donor = int(np.argmax(counts))
        # The donor's last group in shuffled order moves, so the choice still depends only on the seed.
        name = [n for n in order if assignment[n] == donor][-1]
        assignment[name] = subset_index


def split_windows(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    """Split n patches at random into train, val and test, as the original study did.

    Overlapping patches of one region can land in different subsets, so this
    split leaks; ``split_by_group`` is the default for that reason. With
    n >= 3, no subset of non-zero fraction is empty.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``, sorted int64 index arrays.
    """
    fractions = check_fractions(fractions)
    if n < 0:
        raise ValueError(f"number of patches {n} is negative")
    permutation = np.random.default_rng(seed).permutation(n)

    counts = np.floor(np.asarray(fractions) * n).astype(np.int64)
    # Hand the remaining patches to the subsets with the largest remainders.
    remainders = np.asarray(fractions) * n - counts
    for i in np.argsort(-remainders, kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    if n >= 3:
        for i in range(3):
            if fractions[i] > 0 and counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1

    bounds = np.cumsum(counts)[:-1]
    parts = np.split(permutation, bounds)
    return {subset: np.sort(part) for subset, part in zip(SUBSETS, parts)}
