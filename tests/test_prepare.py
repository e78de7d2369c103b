"""The prepare command: cache, export, MLflow run and bad input, on synthetic and real data."""

from __future__ import annotations

from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.io

from granularity.cli import main
from granularity.data.prepared import prepare_dataset

from conftest import CLASS_MAPS

CONSEP_MAP = CLASS_MAPS / "consep.yaml"


def _write_consep_region(root: Path, split: str, name: str, instances: np.ndarray, types: list[int]) -> None:
    """Write one CoNSeP-layout region: a random RGB image and a .mat label file."""
    (root / split / "Images").mkdir(parents=True, exist_ok=True)
    (root / split / "Labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    image = rng.integers(0, 255, size=instances.shape + (3,), dtype=np.uint8)
    cv2.imwrite(str(root / split / "Images" / f"{name}.png"), image)
    inst_type = np.array(types, dtype=np.int32).reshape(-1, 1)
    lookup = np.zeros(instances.max() + 1, dtype=np.uint8)
    lookup[1 : len(types) + 1] = types
    scipy.io.savemat(
        root / split / "Labels" / f"{name}.mat",
        {"inst_map": instances.astype(np.int32), "inst_type": inst_type, "type_map": lookup[instances]},
    )


def _synthetic_instances(seed: int, size: int = 96) -> tuple[np.ndarray, list[int]]:
    """Draw a few disjoint discs and a square as nuclei with merged CoNSeP class ids 1..4."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((size, size), dtype=np.int32)
    types = []
    centres = [(20, 20), (20, 70), (70, 22), (66, 66), (45, 45)]
    for index, (cy, cx) in enumerate(centres, start=1):
        radius = int(rng.integers(4, 8))
        cv2.circle(instances, (cx, cy), radius, index, thickness=-1)
        types.append(int(rng.integers(1, 5)))
    return instances, types


@pytest.fixture
def synthetic_consep(tmp_path) -> Path:
    root = tmp_path / "tiny-consep"
    for split, prefix in (("Train", "train"), ("Test", "test")):
        for tile in range(3):
            for patch in range(2):
                instances, types = _synthetic_instances(seed=tile * 10 + patch + (100 if split == "Test" else 0))
                _write_consep_region(root, split, f"{prefix}_{tile}_{patch:03d}", instances, types)
    return root


def test_cache_reused_for_same_input(synthetic_consep, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(32,), cache_root=cache)
    second = prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(32,), cache_root=cache)

    assert not first.cache_hit
    assert second.cache_hit
    assert first.digest == second.digest
    for granularity in ("pw", "el", "bd"):
        pd.testing.assert_frame_equal(first.windows[(32, granularity)], second.windows[(32, granularity)])
        for a, b in zip(first.maps, second.maps):
            np.testing.assert_array_equal(a.instance_maps[granularity], b.instance_maps[granularity])
    assert len(list(cache.iterdir())) == 1


def test_cache_key_changes_with_input(synthetic_consep, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(32,), cache_root=cache)
    instances, types = _synthetic_instances(seed=999)
    _write_consep_region(synthetic_consep, "Train", "train_9_000", instances, types)
    second = prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(32,), cache_root=cache)

    assert first.digest != second.digest
    assert not second.cache_hit
    assert len(second.regions) == len(first.regions) + 1


def test_new_patch_size_labelled_from_cached_maps(synthetic_consep, tmp_path):
    cache = tmp_path / "cache"
    prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(32,), cache_root=cache)
    cached = prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(64,), cache_root=cache)
    fresh = prepare_dataset(synthetic_consep, "consep", CONSEP_MAP, patch_sizes=(64,), use_cache=False)

    assert cached.cache_hit
    for granularity in ("pw", "el", "bd"):
        pd.testing.assert_frame_equal(cached.windows[(64, granularity)], fresh.windows[(64, granularity)])


def test_bad_label_leaves_no_cache(synthetic_consep, tmp_path):
    cache = tmp_path / "cache"
    instances, _ = _synthetic_instances(seed=5)
    _write_consep_region(synthetic_consep, "Train", "train_8_000", instances, [1, 2, 3, 4, 9])

    code = main(["prepare", "--dataset", str(synthetic_consep), "--format", "consep", "--class-map", str(CONSEP_MAP),
                 "--cache-dir", str(cache), "--patch-sizes", "32"])

    assert code == 2
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_dataset_exit_code(tmp_path, tracking_uri, capsys):
    code = main(["prepare", "--dataset", str(tmp_path / "absent"), "--format", "consep", "--class-map", str(CONSEP_MAP)])

    assert code == 2
    assert "absent" in capsys.readouterr().err


def test_patch_size_larger_than_regions(synthetic_consep, tracking_uri, capsys):
    code = main(["prepare", "--dataset", str(synthetic_consep), "--format", "consep", "--class-map", str(CONSEP_MAP),
                 "--patch-sizes", "128", "--no-cache"])

    assert code == 2
    assert "128" in capsys.readouterr().err


def test_prepare_logs_run_and_exports(synthetic_consep, tmp_path, tracking_uri):
    export = tmp_path / "export"
    code = main(["prepare", "--dataset", str(synthetic_consep), "--format", "consep", "--class-map", str(CONSEP_MAP),
                 "--patch-sizes", "32,64", "--export", str(export), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0

    runs = mlflow.search_runs(experiment_names=["annotation-granularity"], filter_string="tags.task = 'prepare'")
    assert len(runs) == 1
    run = mlflow.get_run(runs.loc[0, "run_id"])

    # Count nuclei per class independently from the label files.
    expected = np.zeros(5, dtype=int)
    for label in synthetic_consep.glob("*/Labels/*.mat"):
        expected += np.bincount(scipy.io.loadmat(label)["inst_type"].ravel(), minlength=5)
    for index, name in enumerate(["other", "inflammatory", "epithelial", "spindle"], start=1):
        assert run.data.metrics[f"nuclei_{name}"] == expected[index]
    assert run.data.metrics["nuclei_total"] == expected.sum()
    assert run.data.metrics["regions"] == 12
    assert run.data.tags["dataset_digest"]

    for size in (32, 64):
        for granularity in ("pw", "el", "bd"):
            table = pd.read_csv(export / f"patches_{size}_{granularity}.csv")
            assert list(table.columns) == ["region", "x", "y", "size", "label"]
            assert run.data.metrics[f"patches_{size}_{granularity}"] == len(table)

    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "annotation_granularities.png" in artifacts

    # The pw export equals each label file's type_map.
    for label in synthetic_consep.glob("*/Labels/*.mat"):
        exported = cv2.imread(str(export / "pw" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(exported, scipy.io.loadmat(label)["type_map"])


@pytest.mark.slow
def test_real_consep_export(consep_root, tmp_path, tracking_uri):
    export = tmp_path / "export"
    code = main(["prepare", "--dataset", str(consep_root), "--format", "consep", "--class-map", str(CONSEP_MAP),
                 "--export", str(export), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0

    labels = sorted(consep_root.glob("*/Labels/*.mat"))
    assert len(labels) == 656
    for label in labels:
        type_map = scipy.io.loadmat(label)["type_map"]
        pw = cv2.imread(str(export / "pw" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        bd = cv2.imread(str(export / "bd" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(pw, type_map)
        assert np.all(bd[pw > 0] > 0), f"{label.stem}: a pw nucleus pixel is background in its bd mask"
    for size in (32, 64, 128):
        for granularity in ("pw", "el", "bd"):
            assert (export / f"patches_{size}_{granularity}.csv").is_file()


def test_real_pannuke_prepare(pannuke_root, tmp_path, tracking_uri):
    code = main(["prepare", "--dataset", str(pannuke_root), "--format", "coco", "--class-map",
                 str(CLASS_MAPS / "pannuke.yaml"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0

    runs = mlflow.search_runs(experiment_names=["annotation-granularity"])
    metrics = runs.iloc[0]
    assert metrics["metrics.nuclei_neoplastic"] == 216
    assert metrics["metrics.nuclei_non-neoplastic"] == 415
