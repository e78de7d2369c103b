"""Patch-classification metrics, computed with torchmetrics over batches.

Metric names, without the ``val_``, ``test_`` or ``own_test_`` prefix that the caller adds:

- ``precision``, ``recall``, ``f1``: macro averages over classes. As in
  torchmetrics 1.x, a class absent from both the truth and the predictions
  is left out of the average, and a class with no predictions scores 0
  precision; scikit-learn gives the same numbers with
  ``labels=<classes present>`` and ``zero_division=0``.
- ``accuracy``: correct patches / all patches.
- ``class_accuracy_<class name>``: recall of that class, the "accuracy per
  class" of patch-classification studies; NaN when the class has no patches.

The confusion matrix has true classes in rows and predicted classes in columns.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

CLASS_ACCURACY_PREFIX = "class_accuracy_"

# MLflow metric names may hold letters, digits, underscores, dashes, periods, spaces, colons and slashes.
_INVALID_METRIC_CHARACTERS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def class_metric_name(class_name: str) -> str:
    """Return the ``class_accuracy_<class name>`` metric name, with characters MLflow rejects replaced by ``_``."""
    return CLASS_ACCURACY_PREFIX + _INVALID_METRIC_CHARACTERS.sub("_", class_name)


def with_prefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """Return ``metrics`` with ``prefix`` (such as ``test_``) before every name."""
    return {f"{prefix}{name}": value for name, value in metrics.items()}


class ClassificationMetrics:
    """Accumulates predictions batch by batch and computes the classification metrics.

    ``update`` takes either logits / probabilities (N x K) or predicted class
    indices (N) with the true class indices (N).
    """

    def __init__(self, class_names: Sequence[str], device: torch.device | str = "cpu"):
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        if num_classes < 2:
            raise ValueError(f"classification metrics need at least 2 classes, got {self.class_names}")

        self.metrics = MetricCollection(
            {
                "precision": MulticlassPrecision(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average="macro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "class_recall": MulticlassRecall(num_classes, average=None),
                "support": MulticlassConfusionMatrix(num_classes),
            },
            compute_groups=False,
        ).to(device)
        self.count = 0

    def reset(self) -> None:
        self.metrics.reset()
        self.count = 0

    def update(self, predictions: torch.Tensor, target: torch.Tensor) -> None:
        if predictions.dim() == 2:
            predictions = predictions.argmax(dim=1)
        self.metrics.update(predictions.long(), target.long())
        self.count += int(target.numel())

    def confusion_matrix(self) -> np.ndarray:
        """Return the K x K count matrix, true classes in rows, predicted classes in columns."""
        if self.count == 0:
            return np.zeros((len(self.class_names),) * 2, dtype=np.int64)
        return self.metrics["support"].compute().cpu().numpy().astype(np.int64)

    def compute(self) -> dict[str, float]:
        """Return the metrics by name; all are NaN before any patch was seen."""
        if self.count == 0:
            names = ["precision", "recall", "f1", "accuracy"] + [class_metric_name(name) for name in self.class_names]
            return {name: math.nan for name in names}

        values = self.metrics.compute()
        result = {name: float(values[name]) for name in ("precision", "recall", "f1", "accuracy")}

        # torchmetrics scores a class without patches 0; NaN keeps it apart from a class never recognised.
        class_recall = values["class_recall"].cpu().numpy()
        support = self.confusion_matrix().sum(axis=1)
        for index, name in enumerate(self.class_names):
            result[class_metric_name(name)] = float(class_recall[index]) if support[index] > 0 else math.nan
        return result


def classification_metrics(predictions: torch.Tensor, target: torch.Tensor, class_names: Sequence[str]) -> dict[str, float]:
    """Return the metrics of one set of predictions (logits or class indices) against ``target``."""
    metrics = ClassificationMetrics(class_names)
    metrics.update(torch.as_tensor(predictions), torch.as_tensor(target))
    return metrics.compute()
