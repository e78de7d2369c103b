"""Splits by region group and over patches, and class balancing."""

from __future__ import annotations

import numpy as np
import pytest

from granularity.data.balance import EmptyClassError, balance_classes
from granularity.data.splits import InvalidFractionsError, split_by_group, split_windows
from granularity.errors import UserError


def consep_like_groups(tiles: int = 41, per_tile: int = 16) -> list[str]:
    return [f"tile_{t}" for t in range(tiles) for _ in range(per_tile)]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_group_split_keeps_groups_whole(seed):
    groups = consep_like_groups()
    split = split_by_group(groups, seed=seed)

    indices = sorted(i for subset in split.values() for i in subset)
    assert indices == list(range(len(groups)))
    subsets_of_group = {}
    for subset, members in split.items():
        for i in members:
            subsets_of_group.setdefault(groups[i], set()).add(subset)
    assert all(len(s) == 1 for s in subsets_of_group.values())


def test_group_split_fractions():
    groups = consep_like_groups()
    split = split_by_group(groups, (0.8, 0.1, 0.1), seed=3)

    # 41 tiles of 16: each subset is within one tile of its target.
    for subset, fraction in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        assert abs(len(split[subset]) - fraction * len(groups)) <= 16


def test_group_split_deterministic_in_seed():
    groups = consep_like_groups()
    assert split_by_group(groups, seed=5) == split_by_group(groups, seed=5)
    assert split_by_group(groups, seed=5) != split_by_group(groups, seed=6)


@pytest.mark.parametrize("seed", range(6))
def test_three_groups_fill_every_subset(seed):
    groups = ["a"] * 10 + ["b"] * 3 + ["c"] * 1
    split = split_by_group(groups, seed=seed)

    assert all(len(split[s]) > 0 for s in ("train", "val", "test"))
    assert sorted(len(members) for members in split.values()) == [1, 3, 10]


def test_unequal_groups_uneven_order():
    groups = ["x", "y", "x", "z", "y", "x", "w"]
    split = split_by_group(groups, (0.5, 0.25, 0.25), seed=0)

    for subset, members in split.items():
        names = {groups[i] for i in members}
        others = {groups[i] for s, m in split.items() if s != subset for i in m}
        assert not names & others


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.8, 0.1), "exactly three"),
        ((0.8, 0.3, 0.1), "sum to 1.2"),
        ((0.9, -0.1, 0.2), ">= 0"),
        ((0.0, 0.5, 0.5), "train fraction > 0"),
        (("a", 0.1, 0.1), "three numbers"),
    ],
)
def test_invalid_fractions_raise(fractions, message):
    with pytest.raises(InvalidFractionsError, match=message) as raised:
        split_by_group(["a", "b", "c"], fractions)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, UserError)
    assert repr(fractions[0]) in str(raised.value)
    with pytest.raises(ValueError):
        split_windows(10, fractions)


def test_window_split_sizes():
    split = split_windows(100, (0.8, 0.1, 0.1), seed=0)

    assert [len(split[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(100))
    assert split_windows(100, seed=0)["test"].tolist() == split["test"].tolist()
    assert split_windows(100, seed=1)["test"].tolist() != split["test"].tolist()


def test_window_split_small_n_non_empty():
    split = split_windows(3, (0.8, 0.1, 0.1), seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_balance_equal_counts():
    labels = np.array([0] * 50 + [1] * 7 + [2] * 20)
    chosen = balance_classes(labels, num_classes=3, seed=0)

    assert np.bincount(labels[chosen], minlength=3).tolist() == [7, 7, 7]
    assert len(set(chosen.tolist())) == len(chosen)
    assert np.array_equal(chosen, balance_classes(labels, num_classes=3, seed=0))
    assert not np.array_equal(chosen, balance_classes(labels, num_classes=3, seed=1))


def test_balance_cap():
    labels = np.array([0] * 50 + [1] * 30)
    chosen = balance_classes(labels, num_classes=2, seed=0, max_per_class=12)
    assert np.bincount(labels[chosen]).tolist() == [12, 12]


def test_balance_empty_class_raises():
    labels = np.array([0, 0, 2, 2, 2])
    with pytest.raises(EmptyClassError) as raised:
        balance_classes(labels, num_classes=3, seed=0, class_names=["other", "inflammatory", "epithelial"])
    message = str(raised.value)
    assert "inflammatory has no patches" in message
    assert "other 2, inflammatory 0, epithelial 3" in message


def test_balance_allow_missing():
    labels = np.array([0, 0, 2, 2, 2])
    chosen = balance_classes(labels, num_classes=3, seed=0, allow_missing=True)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [2, 0, 2]


def test_balance_label_out_of_range():
    with pytest.raises(ValueError, match="patch label 5"):
        balance_classes(np.array([0, 5]), num_classes=3, seed=0)
