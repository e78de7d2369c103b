"""Segmentation metrics against scikit-learn, numpy counting and a brute-force instance matcher."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.measure import label as skimage_label
from sklearn.metrics import accuracy_score, f1_score

from granularity.metrics.segmentation import SegmentationMetrics, label_instances, segmentation_metrics

CLASS_NAMES = ["normal", "grade1", "grade2"]
TUMOUR = [1, 2]


def _square(mask: np.ndarray, y: int, x: int, size: int, value: int) -> None:
    mask[y : y + size, x : x + size] = value


def _region_a():
    """Return truth (classes, instances with non-contiguous ids) and a prediction for a 16 x 16 region.

    Nucleus 7 (normal) is predicted well, nucleus 42 (grade 1) is predicted as
    grade 2, nucleus 1000 (grade 1) is half covered (IoU 0.5, no match), and the
    prediction holds one extra grade-1 blob. Class grade2 is absent from the truth.
    """
    instances = np.zeros((16, 16), dtype=np.int32)
    _square(instances, 1, 1, 4, 7)
    _square(instances, 1, 8, 4, 42)
    _square(instances, 9, 1, 4, 1000)
    classes = {7: 0, 42: 1, 1000: 1}
    truth = np.zeros_like(instances, dtype=np.uint8)
    for instance_id, class_index in classes.items():
        truth[instances == instance_id] = class_index + 1

    prediction = np.zeros_like(truth)
    _square(prediction, 1, 1, 4, 1)
    prediction[1, 1] = 0  # IoU 15/16
    _square(prediction, 1, 8, 4, 3)
    prediction[9:13, 1:3] = 2  # half of nucleus 1000: IoU exactly 0.5
    _square(prediction, 12, 10, 3, 2)
    return prediction, truth, instances


def _region_b():
    """Return a region where every class except grade1 appears and the prediction misses one nucleus."""
    instances = np.zeros((12, 10), dtype=np.int32)
    _square(instances, 0, 0, 3, 5)
    _square(instances, 5, 5, 4, 9)
    classes = {5: 0, 9: 2}
    truth = np.zeros_like(instances, dtype=np.uint8)
    for instance_id, class_index in classes.items():
        truth[instances == instance_id] = class_index + 1
    prediction = np.zeros_like(truth)
    _square(prediction, 5, 5, 4, 3)
    prediction[5:9, 8] = 0  # IoU 12/16 with nucleus 9
    return prediction, truth, instances


def _reference_instance_counts(prediction, truth, instances, class_aware: bool):
    """Brute-force matching: every predicted component against every true nucleus, IoU > 0.5."""
    predicted = []
    for value in np.unique(prediction):
        if value == 0:
            continue
        components = skimage_label(prediction == value, connectivity=1)
        for component in range(1, components.max() + 1):
            predicted.append((int(value), components == component))
    true = [(int(truth[instances == i][0]), instances == i) for i in np.unique(instances) if i != 0]

    counts = {}
    keys = sorted({v for v, _ in predicted} | {v for v, _ in true} | set(range(1, len(CLASS_NAMES) + 1)))
    keys = keys if class_aware else [1]
    for key in keys:
        counts[key] = {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0}
    matched_true = set()
    for value, mask in predicted:
        key = value if class_aware else 1
        hit = False
        for index, (true_value, true_mask) in enumerate(true):
            if class_aware and true_value != value:
                continue
            iou = np.logical_and(mask, true_mask).sum() / np.logical_or(mask, true_mask).sum()
            if iou > 0.5:
                hit = True
                matched_true.add(index)
                counts[key]["tp"] += 1
                counts[key]["iou"] += iou
        if not hit:
            counts[key]["fp"] += 1
    for index, (true_value, _) in enumerate(true):
        if index not in matched_true:
            counts[true_value if class_aware else 1]["fn"] += 1
    return counts


def _reference_scores(counts):
    scores = {}
    for key, c in counts.items():
        denominator = c["tp"] + 0.5 * c["fp"] + 0.5 * c["fn"]
        if denominator == 0:
            scores[key] = (math.nan, math.nan)
            continue
        f1 = c["tp"] / denominator
        mean_iou = c["iou"] / c["tp"] if c["tp"] else 0.0
        scores[key] = (f1, f1 * mean_iou)
    return scores


def _merge_counts(*all_counts):
    merged = {}
    for counts in all_counts:
        for key, c in counts.items():
            target = merged.setdefault(key, {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
            for field in target:
                target[field] += c[field]
    return merged


def _assert_pixel_scores(scores, prediction, truth):
    y_true = truth.ravel()
    y_pred = prediction.ravel()
    assert scores["pixel_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["dice"] == pytest.approx(f1_score(y_true > 0, y_pred > 0))

    per_class = f1_score(y_true, y_pred, labels=[1, 2, 3], average=None, zero_division=np.nan)
    for index, name in enumerate(CLASS_NAMES):
        present = np.any(y_true == index + 1) or np.any(y_pred == index + 1)
        if present:
            assert scores[f"dice_{name}"] == pytest.approx(per_class[index])
        else:
            assert math.isnan(scores[f"dice_{name}"])

    nucleus = y_true > 0
    assert scores["nuclei_recall"] == pytest.approx(np.count_nonzero(y_pred[nucleus] > 0) / np.count_nonzero(nucleus))
    tumour = np.isin(y_true, [2, 3])
    assert scores["cancer_recall"] == pytest.approx(np.count_nonzero(np.isin(y_pred[tumour], [2, 3])) / np.count_nonzero(tumour))


def _assert_instance_scores(scores, aware_counts, agnostic_counts):
    aware = _reference_scores(aware_counts)
    for index, name in enumerate(CLASS_NAMES):
        f1, pq = aware[index + 1]
        for key, expected in ((f"detection_f1_{name}", f1), (f"pq_{name}", pq)):
            if math.isnan(expected):
                assert math.isnan(scores[key]), key
            else:
                assert scores[key] == pytest.approx(expected), key
    f1, pq = _reference_scores(agnostic_counts)[1]
    assert scores["detection_f1"] == pytest.approx(f1)
    assert scores["pq"] == pytest.approx(pq)


def test_pixel_scores_one_region():
    prediction, truth, instances = _region_a()
    scores = segmentation_metrics(prediction, truth, instances, CLASS_NAMES, TUMOUR)
    _assert_pixel_scores(scores, prediction, truth)


def test_instance_scores_one_region():
    prediction, truth, instances = _region_a()
    scores = segmentation_metrics(prediction, truth, instances, CLASS_NAMES, TUMOUR)

    # By hand: class-agnostic, nuclei 7 and 42 match, 1000 does not (IoU = 0.5 is not > 0.5).
    assert scores["detection_f1"] == pytest.approx(2 / (2 + 0.5 * 2 + 0.5 * 1))
    assert scores["detection_f1_normal"] == pytest.approx(1.0)
    assert scores["pq_normal"] == pytest.approx(15 / 16)
    assert scores["detection_f1_grade1"] == pytest.approx(0.0)

    aware = _reference_instance_counts(prediction, truth, instances, class_aware=True)
    agnostic = _reference_instance_counts(prediction, truth, instances, class_aware=False)
    _assert_instance_scores(scores, aware, agnostic)


def test_absent_class_is_nan():
    prediction, truth, instances = _region_a()
    prediction[prediction == 3] = 2  # now grade2 is absent from truth and prediction
    scores = segmentation_metrics(prediction, truth, instances, CLASS_NAMES, TUMOUR)
    assert math.isnan(scores["dice_grade2"])
    assert math.isnan(scores["detection_f1_grade2"])
    assert math.isnan(scores["pq_grade2"])
    assert not math.isnan(scores["dice_grade1"])


def test_accumulated_scores_sum_counts():
    regions = [_region_a(), _region_b()]
    metric = SegmentationMetrics(CLASS_NAMES, TUMOUR)
    for region in regions:
        metric.update(*region)
    scores = metric.compute()
    assert metric.regions == 2

    # Pixel scores over the concatenated pixels equal scores from summed counts.
    prediction = np.concatenate([r[0].ravel() for r in regions])
    truth = np.concatenate([r[1].ravel() for r in regions])
    _assert_pixel_scores(scores, prediction, truth)

    aware = _merge_counts(*(_reference_instance_counts(*r, class_aware=True) for r in regions))
    agnostic = _merge_counts(*(_reference_instance_counts(*r, class_aware=False) for r in regions))
    _assert_instance_scores(scores, aware, agnostic)


def test_accumulated_differs_from_mean_of_regions():
    regions = [_region_a(), _region_b()]
    metric = SegmentationMetrics(CLASS_NAMES, TUMOUR)
    for region in regions:
        metric.update(*region)
    per_region = [segmentation_metrics(*r, CLASS_NAMES, TUMOUR)["pixel_accuracy"] for r in regions]
    assert metric.compute()["pixel_accuracy"] != pytest.approx(np.mean(per_region))


def test_confusion_rows_are_truth():
    prediction, truth, instances = _region_b()
    metric = SegmentationMetrics(CLASS_NAMES, TUMOUR)
    metric.update(prediction, truth, instances)
    confusion = metric.confusion
    for true_value in range(4):
        for pred_value in range(4):
            expected = np.count_nonzero((truth == true_value) & (prediction == pred_value))
            assert confusion[true_value, pred_value] == expected


def test_no_tumour_class_gives_nan_cancer_recall():
    prediction, truth, instances = _region_b()
    scores = segmentation_metrics(prediction, truth, instances, CLASS_NAMES, ())
    assert math.isnan(scores["cancer_recall"])


def test_values_outside_class_map_raise():
    prediction, truth, instances = _region_b()
    prediction[0, 0] = 9
    with pytest.raises(ValueError, match="outside 0..3"):
        segmentation_metrics(prediction, truth, instances, CLASS_NAMES, TUMOUR)


def test_label_instances_splits_classes():
    mask = np.array(
        [
            [1, 1, 2, 0],
            [0, 0, 2, 0],
            [1, 0, 0, 1],
        ],
        dtype=np.uint8,
    )
    instances = label_instances(mask)
    ids = np.unique(instances[instances > 0])
    assert len(ids) == 4
    assert instances[0, 0] == instances[0, 1]
    assert instances[0, 1] != instances[0, 2]
    # Diagonal neighbours are separate components under 4-connectivity.
    assert instances[2, 0] != instances[0, 0]
