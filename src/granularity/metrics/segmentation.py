"""Segmentation metrics: pixel scores from a confusion matrix and instance scores from panoptic quality.

Pixel metrics (background is class 0, nucleus class ``k`` is ``k + 1``):

- ``pixel_accuracy``: correctly labelled pixels / all pixels, background included.
- ``dice``: Dice of nucleus (any class) versus background.
- ``dice_<class>``: Dice of one class; NaN where the class is absent from both
  truth and prediction.
- ``nuclei_recall``: true nucleus pixels predicted as any nucleus class / true
  nucleus pixels.
- ``cancer_recall``: true tumour pixels predicted as any tumour class / true
  tumour pixels (tumour classes are flagged in the class map).

Instance metrics: predicted instances are the 4-connected components of each
predicted class, true instances are the nuclei of the instance map. A predicted
instance matches a true one when their IoU exceeds 0.5, which makes the match
unique (Kirillov et al., "Panoptic Segmentation", CVPR 2019).

- ``detection_f1_<class>`` and ``pq_<class>``: matching requires the same class.
  Detection F1 is the recognition quality TP / (TP + FP / 2 + FN / 2), and
  panoptic quality is the mean IoU of the matches times that F1.
- ``detection_f1`` and ``pq``: class-agnostic, with the same instances and
  every class treated as "nucleus", just as ``dice`` is nucleus versus
  background.

Scores over many regions are computed from summed counts, never as means of
per-region scores, so a large region weighs more than a small one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.detection import PanopticQuality

# 4-connectivity, so each component is one simple outline when written as a polygon.
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def label_instances(class_mask: np.ndarray) -> np.ndarray:
    """Return an int32 instance map of the connected components of each class of ``class_mask``.

    Components of different classes get different ids even where they touch,
    so two adjacent nuclei of different classes stay two instances.
    """
    instances = np.zeros(class_mask.shape, dtype=np.int32)
    next_id = 1
    for value in np.unique(class_mask):
        if value == 0:
            continue
        labels, count = ndimage.label(class_mask == value, structure=_FOUR_CONNECTED)
        inside = labels > 0
        instances[inside] = labels[inside] + (next_id - 1)
        next_id += count
    return instances


@dataclass
class _Counts:
    """Summed statistics from which every score is computed."""

    confusion: np.ndarray  # (K + 1) x (K + 1), rows = truth, columns = prediction
    iou_sum: np.ndarray  # K class-aware, then 1 class-agnostic entry
    true_positives: np.ndarray
    false_positives: np.ndarray
    false_negatives: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> "_Counts":
        return cls(
            confusion=np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64),
            iou_sum=np.zeros(num_classes + 1, dtype=np.float64),
            true_positives=np.zeros(num_classes + 1, dtype=np.int64),
            false_positives=np.zeros(num_classes + 1, dtype=np.int64),
            false_negatives=np.zeros(num_classes + 1, dtype=np.int64),
        )

    def __iadd__(self, other: "_Counts") -> "_Counts":
        self.confusion += other.confusion
        self.iou_sum += other.iou_sum
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives
        return self


def _check_inputs(prediction: np.ndarray, truth: np.ndarray, truth_instances: np.ndarray, num_classes: int) -> None:
    if prediction.shape != truth.shape or truth.shape != truth_instances.shape:
        raise ValueError(
            f"prediction {prediction.shape}, truth {truth.shape} and truth instances {truth_instances.shape} differ in shape"
        )
    for name, mask in (("prediction", prediction), ("truth", truth)):
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > num_classes):
            raise ValueError(f"{name} contains values outside 0..{num_classes} (background plus {num_classes} classes)")
    if np.any((truth_instances > 0) != (truth > 0)):
        raise ValueError("truth class mask and truth instance map disagree on which pixels are nuclei")


def _panoptic(class_mask: np.ndarray, instances: np.ndarray) -> torch.Tensor:
    """Return the 1 x H x W x 2 (category, instance) tensor that torchmetrics expects."""
    pairs = np.stack([class_mask.astype(np.int64), instances.astype(np.int64)], axis=-1)
    return torch.from_numpy(pairs).unsqueeze(0)


def _instance_counts(pred_panoptic: torch.Tensor, true_panoptic: torch.Tensor, things: set[int]):
    """Return IoU sum, TP, FP and FN per thing class, in sorted class order."""
    metric = PanopticQuality(things=things, stuffs={0})
    metric.update(pred_panoptic, true_panoptic)

    # torchmetrics orders its per-category state as sorted things, then stuffs.
    size = len(things)
    return (
        metric.iou_sum[:size].double().numpy(),
        metric.true_positives[:size].long().numpy(),
        metric.false_positives[:size].long().numpy(),
        metric.false_negatives[:size].long().numpy(),
    )


def _segmentation_update(
    prediction: np.ndarray, truth: np.ndarray, truth_instances: np.ndarray, num_classes: int
) -> _Counts:
    """Count the statistics of one region."""
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    truth_instances = np.asarray(truth_instances)
    _check_inputs(prediction, truth, truth_instances, num_classes)
    counts = _Counts.zeros(num_classes)

    confusion = MulticlassConfusionMatrix(num_classes=num_classes + 1, validate_args=False)
    confusion.update(torch.from_numpy(prediction.astype(np.int64)).reshape(-1), torch.from_numpy(truth.astype(np.int64)).reshape(-1))
    counts.confusion = confusion.compute().long().numpy()

    pred_instances = label_instances(prediction)
    things = set(range(1, num_classes + 1))
    class_aware = _instance_counts(_panoptic(prediction, pred_instances), _panoptic(truth, truth_instances), things)
    nucleus_pred = (prediction > 0).astype(np.int64)
    nucleus_true = (truth > 0).astype(np.int64)
    class_agnostic = _instance_counts(_panoptic(nucleus_pred, pred_instances), _panoptic(nucleus_true, truth_instances), {1})

    for target, aware, agnostic in zip(
        (counts.iou_sum, counts.true_positives, counts.false_positives, counts.false_negatives), class_aware, class_agnostic
    ):
        target[:num_classes] = aware
        target[num_classes] = agnostic[0]
    return counts


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else math.nan


def _segmentation_compute(counts: _Counts, class_names: Sequence[str], tumour_indices: Sequence[int]) -> dict[str, float]:
    """Turn summed counts into named scores; NaN marks a score whose denominator is zero."""
    confusion = counts.confusion
    scores: dict[str, float] = {"pixel_accuracy": _ratio(np.trace(confusion), confusion.sum())}

    true_nucleus = confusion[1:, :].sum()
    pred_nucleus = confusion[:, 1:].sum()
    both_nucleus = confusion[1:, 1:].sum()
    scores["dice"] = _ratio(2 * both_nucleus, true_nucleus + pred_nucleus)
    scores["nuclei_recall"] = _ratio(both_nucleus, true_nucleus)

    tumour_values = [index + 1 for index in tumour_indices]
    if tumour_values:
        true_tumour = confusion[tumour_values, :].sum()
        hit_tumour = confusion[np.ix_(tumour_values, tumour_values)].sum()
        scores["cancer_recall"] = _ratio(hit_tumour, true_tumour)
    else:
        scores["cancer_recall"] = math.nan

    for index, name in enumerate(class_names):
        value = index + 1
        true_positive = confusion[value, value]
        scores[f"dice_{name}"] = _ratio(2 * true_positive, confusion[value, :].sum() + confusion[:, value].sum())

    num_classes = len(class_names)
    for position, suffix in [(i, f"_{name}") for i, name in enumerate(class_names)] + [(num_classes, "")]:
        tp = counts.true_positives[position]
        denominator = tp + 0.5 * counts.false_positives[position] + 0.5 * counts.false_negatives[position]
        f1 = _ratio(tp, denominator)
        mean_iou = _ratio(counts.iou_sum[position], tp) if tp > 0 else 0.0
        scores[f"detection_f1{suffix}"] = f1
        scores[f"pq{suffix}"] = f1 * mean_iou if not math.isnan(f1) else math.nan
    return scores


class SegmentationMetrics:
    """Accumulate segmentation scores over many regions.

    Call ``update`` once per region with the predicted class mask, the true
    class mask and the true instance map (ids need not be contiguous), then
    ``compute`` for the scores over all regions so far.
    """

    def __init__(self, class_names: Sequence[str], tumour_indices: Sequence[int] = ()):
        self.class_names = list(class_names)
        self.tumour_indices = list(tumour_indices)
        self.reset()

    def reset(self) -> None:
        self._counts = _Counts.zeros(len(self.class_names))
        self.regions = 0

    def update(self, prediction: np.ndarray, truth: np.ndarray, truth_instances: np.ndarray) -> None:
        self._counts += _segmentation_update(prediction, truth, truth_instances, len(self.class_names))
        self.regions += 1

    def compute(self) -> dict[str, float]:
        return _segmentation_compute(self._counts, self.class_names, self.tumour_indices)

    @property
    def confusion(self) -> np.ndarray:
        """The summed (K + 1) x (K + 1) pixel confusion matrix, rows truth, columns prediction."""
        return self._counts.confusion.copy()


def segmentation_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    truth_instances: np.ndarray,
    class_names: Sequence[str],
    tumour_indices: Sequence[int] = (),
) -> dict[str, float]:
    """Return the segmentation scores of one region (see the module docstring for the names)."""
    counts = _segmentation_update(prediction, truth, truth_instances, len(class_names))
    return _segmentation_compute(counts, class_names, tumour_indices)
