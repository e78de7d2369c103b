"""Classification metrics against scikit-learn on known predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from granularity.metrics.classification import ClassificationMetrics, class_metric_name, classification_metrics

CLASS_NAMES = ["normal", "grade 1", "grade 2"]


def _sklearn_reference(target: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    present = sorted(set(target.tolist()) | set(predicted.tolist()))
    reference = {
        "precision": precision_score(target, predicted, labels=present, average="macro", zero_division=0),
        "recall": recall_score(target, predicted, labels=present, average="macro", zero_division=0),
        "f1": f1_score(target, predicted, labels=present, average="macro", zero_division=0),
        "accuracy": accuracy_score(target, predicted),
    }
    per_class = recall_score(target, predicted, labels=[0, 1, 2], average=None, zero_division=0)
    for index, name in enumerate(CLASS_NAMES):
        reference[class_metric_name(name)] = per_class[index] if (target == index).any() else math.nan
    return reference


CASES = {
    "mixed errors": ([0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 0, 1, 2, 1, 2, 2, 0, 1]),
    "all correct": ([0, 1, 2, 2, 1, 0], [0, 1, 2, 2, 1, 0]),
    "class never predicted": ([0, 1, 2, 2, 1, 0, 2], [0, 1, 1, 1, 1, 0, 0]),
    "class absent from truth": ([0, 0, 1, 1, 1], [0, 2, 1, 1, 0]),
    "class absent everywhere": ([0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_metrics_match_sklearn(case):
    target, predicted = (np.array(values) for values in CASES[case])
    result = classification_metrics(torch.tensor(predicted), torch.tensor(target), CLASS_NAMES)
    reference = _sklearn_reference(target, predicted)

    assert set(result) == set(reference)
    for name, expected in reference.items():
        if math.isnan(expected):
            assert math.isnan(result[name]), name
        else:
            assert result[name] == pytest.approx(expected, abs=1e-6), name


def test_metrics_accumulate_batches_like_one_batch():
    generator = np.random.default_rng(7)
    target = generator.integers(0, 3, size=101)
    logits = generator.normal(size=(101, 3)).astype(np.float32)

    batched = ClassificationMetrics(CLASS_NAMES)
    for start in range(0, 101, 16):
        batched.update(torch.tensor(logits[start : start + 16]), torch.tensor(target[start : start + 16]))
    result = batched.compute()
    reference = _sklearn_reference(target, logits.argmax(axis=1))

    for name, expected in reference.items():
        assert result[name] == pytest.approx(expected, abs=1e-6), name
    np.testing.assert_array_equal(batched.confusion_matrix(), confusion_matrix(target, logits.argmax(axis=1), labels=[0, 1, 2]))


def test_metrics_empty_are_nan():
    result = ClassificationMetrics(CLASS_NAMES).compute()

    assert math.isnan(result["f1"])
    assert math.isnan(result[class_metric_name("normal")])


def test_class_metric_name_keeps_mlflow_characters():
    assert class_metric_name("grade 1") == "class_accuracy_grade 1"
    assert class_metric_name("non-neoplastic") == "class_accuracy_non-neoplastic"
    assert class_metric_name("tumour (G2)") == "class_accuracy_tumour _G2_"
