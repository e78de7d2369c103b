"""Compare on runs logged by hand with the documented tags and metric names."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from scipy import stats

from granularity.cli import main
from granularity.report.compare import compare
from granularity.tracking.search import find_experiment_id, read_runs

from conftest import reset_fluent_uri

EXPERIMENT = "hand-logged"
CLASSES = ("normal", "tumour")
RNG = np.random.default_rng(7)


def log_classification(model, granularity, patch_size, seed, metrics, status="FINISHED", parent=None, config_key=None):
    """Log one classification run the way ``classify`` names things; return its id."""
    tags = {"task": "classification", "granularity": granularity, "model": model, "patch_size": str(patch_size), "dataset": "toy"}
    tags["config_key"] = config_key or f"{model}-{granularity}-{patch_size}-{seed}"
    with mlflow.start_run(parent_run_id=parent) as run:
        mlflow.set_tags(tags)
        mlflow.log_param("seed", seed)
        mlflow.log_metrics(metrics)
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def log_segmentation(model, granularity, seed, metrics, parent=None):
    tags = {"task": "segmentation", "granularity": granularity, "model": model, "dataset": "toy", "config_key": f"{model}-{granularity}-{seed}"}
    with mlflow.start_run(parent_run_id=parent) as run:
        mlflow.set_tags(tags)
        mlflow.log_param("seed", seed)
        mlflow.log_metrics(metrics)
    return run.info.run_id


def random_classification_metrics():
    metrics = {name: float(RNG.uniform(0.5, 0.95)) for name in ("test_precision", "test_recall", "test_f1", "test_accuracy")}
    metrics.update({f"test_class_accuracy_{name}": float(RNG.uniform(0.4, 1.0)) for name in CLASSES})
    return metrics


def random_segmentation_metrics():
    names = ("test_pixel_accuracy", "test_dice", "test_nuclei_recall", "test_cancer_recall", "test_detection_f1", "test_pq")
    return {name: float(RNG.uniform(0.3, 0.99)) for name in names}



@pytest.fixture
def store(tracking_uri):
    """Point the fluent MLflow API at the test's own store; it keeps the URI of an earlier test otherwise."""
    mlflow.set_tracking_uri(tracking_uri)
    yield tracking_uri
    reset_fluent_uri()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Log a small study by hand: 2 models x 3 granularities x 2 patch sizes x 3 seeds, plus segmentation.

    The store is shared by the tests of this module that only read it, because logging the runs takes a while.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('logged') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name="study") as parent:
            mlflow.set_tag("task", "study")
        parent_id = parent.info.run_id
        values = _log_study(parent_id)
        reset_fluent_uri()
        yield parent_id, pd.DataFrame(values)
    reset_fluent_uri()


def _log_study(parent_id: str) -> list[dict]:
    values = []
    for model in ("resnet18", "mobilenet"):
        for granularity in ("bd", "el", "pw"):
            for patch_size in (32, 64):
                # The pw run of seed 2 at patch 64 is missing on purpose, so one cell has n=2.
                seeds = (0, 1) if (granularity, patch_size) == ("pw", 64) else (0, 1, 2)
                for seed in seeds:
                    metrics = random_classification_metrics()
                    log_classification(model, granularity, patch_size, seed, metrics, parent=parent_id)
                    values.append({"task": "classification", "model": model, "granularity": granularity, "patch_size": patch_size, "seed": seed, **metrics})
    for model in ("unet", "fpn"):
        for granularity in ("bd", "el", "pw"):
            for seed in (0, 1):
                metrics = random_segmentation_metrics()
                log_segmentation(model, granularity, seed, metrics, parent=parent_id)
                values.append({"task": "segmentation", "model": model, "granularity": granularity, "seed": seed, **metrics})
    return values


def expected_cell(values: pd.DataFrame, metric: str, scale: float, **keys) -> tuple[float, float, int]:
    selected = values
    for name, value in keys.items():
        selected = selected[selected[name] == value]
    column = selected[metric].to_numpy(float) * scale
    return float(np.mean(column)), float(np.std(column, ddof=1)) if len(column) > 1 else math.nan, len(column)


def cell(cells: pd.DataFrame, **keys) -> pd.Series:
    selected = cells
    for name, value in keys.items():
        selected = selected[selected[name] == value]
    assert len(selected) == 1, keys
    return selected.iloc[0]


def test_table2_reproduces_mean_std_n(logged, tmp_path):
    parent_id, values = logged
    result = compare(EXPERIMENT, tmp_path / "out", study_run_id=parent_id, log_run=False)
    cells = result.tables[0].cells

    classification = values[values["task"] == "classification"]
    assert len(cells) == 2 * 3 * 2 * 3
    for metric, label in (("test_precision", "precision"), ("test_recall", "recall"), ("test_f1", "F1")):
        for model in ("resnet18", "mobilenet"):
            for granularity in ("bd", "el", "pw"):
                for patch_size in (32, 64):
                    mean, std, n = expected_cell(classification, metric, 100.0, model=model, granularity=granularity, patch_size=patch_size)
                    row = cell(cells, metric=label, model=model, granularity=granularity, patch_size=patch_size)
                    assert row["mean"] == pytest.approx(mean, rel=1e-12)
                    assert row["std"] == pytest.approx(std, rel=1e-12)
                    assert row["n"] == n


def test_table2_marks_best_granularity(logged, tmp_path):
    parent_id, values = logged
    cells = compare(EXPERIMENT, tmp_path / "out", study_run_id=parent_id, log_run=False).tables[0].cells
    f1 = values[values["task"] == "classification"].groupby(["model", "patch_size", "granularity"])["test_f1"].mean()

    for model in ("resnet18", "mobilenet"):
        for patch_size in (32, 64):
            best = f1.loc[(model, patch_size)].idxmax()
            marked = cells[(cells["metric"] == "F1") & (cells["model"] == model) & (cells["patch_size"] == patch_size) & cells["best"]]
            assert list(marked["granularity"]) == [best]


def test_table3_reproduces_class_accuracy(logged, tmp_path):
    parent_id, values = logged
    cells = compare(EXPERIMENT, tmp_path / "out", study_run_id=parent_id, log_run=False).tables[1].cells
    classification = values[values["task"] == "classification"]

    assert sorted(set(cells["class"])) == sorted(CLASSES)
    for name in CLASSES:
        mean, std, n = expected_cell(classification, f"test_class_accuracy_{name}", 100.0, model="mobilenet", granularity="pw", patch_size=64)
        row = cell(cells, **{"class": name, "model": "mobilenet", "granularity": "pw", "patch_size": 64})
        assert row["mean"] == pytest.approx(mean, rel=1e-12)
        assert row["std"] == pytest.approx(std, rel=1e-12)
        assert row["n"] == n == 2


def test_table4_reproduces_segmentation(logged, tmp_path):
    parent_id, values = logged
    cells = compare(EXPERIMENT, tmp_path / "out", study_run_id=parent_id, log_run=False).tables[2].cells
    segmentation = values[values["task"] == "segmentation"]

    for metric, label, scale in (("test_pixel_accuracy", "pixel accuracy %", 100.0), ("test_dice", "Dice", 1.0), ("test_pq", "PQ", 1.0)):
        for model in ("unet", "fpn"):
            for granularity in ("bd", "el", "pw"):
                mean, std, n = expected_cell(segmentation, metric, scale, model=model, granularity=granularity)
                row = cell(cells, metric=label, model=model, granularity=granularity)
                assert row["mean"] == pytest.approx(mean, rel=1e-12)
                assert row["std"] == pytest.approx(std, rel=1e-12)
                assert row["n"] == n == 2


def test_improvement_matches_hand_computation(logged, tmp_path):
    parent_id, values = logged
    improvement = compare(EXPERIMENT, tmp_path / "out", study_run_id=parent_id, log_run=False).improvement
    classification = values[values["task"] == "classification"].set_index(["model", "patch_size", "seed", "granularity"])["test_f1"]

    differences = []
    for model in ("resnet18", "mobilenet"):
        for patch_size in (32, 64):
            for seed in (0, 1, 2):
                if (model, patch_size, seed, "pw") in classification.index:
                    differences.append(100 * (classification[(model, patch_size, seed, "pw")] - classification[(model, patch_size, seed, "bd")]))
    differences = np.array(differences)
    low, high = stats.t.interval(0.95, len(differences) - 1, loc=differences.mean(), scale=stats.sem(differences))
    p_value = stats.ttest_1samp(differences, 0.0).pvalue

    row = improvement[(improvement["metric"] == "test_f1") & (improvement["baseline"] == "bd")].iloc[0]
    assert row["pairs"] == len(differences) == 10
    assert row["mean_gain"] == pytest.approx(differences.mean(), rel=1e-10)
    assert row["ci_low"] == pytest.approx(low, rel=1e-10)
    assert row["ci_high"] == pytest.approx(high, rel=1e-10)
    assert row["p_value"] == pytest.approx(p_value, rel=1e-8)


def test_improvement_single_pair_has_no_interval(store, tmp_path):
    mlflow.set_experiment(EXPERIMENT)
    pw = random_classification_metrics()
    bd = random_classification_metrics()
    log_classification("vgg16", "pw", 32, 0, pw)
    log_classification("vgg16", "bd", 32, 0, bd)

    improvement = compare(EXPERIMENT, tmp_path / "out", log_run=False).improvement
    row = improvement[(improvement["metric"] == "test_recall") & (improvement["baseline"] == "bd")].iloc[0]
    assert row["pairs"] == 1
    assert row["mean_gain"] == pytest.approx(100 * (pw["test_recall"] - bd["test_recall"]))
    assert math.isnan(row["ci_low"])
    assert math.isnan(row["p_value"])
    el_row = improvement[(improvement["metric"] == "test_recall") & (improvement["baseline"] == "el")].iloc[0]
    assert el_row["pairs"] == 0


def test_unusable_runs_listed_and_left_out(store, tmp_path):
    mlflow.set_experiment(EXPERIMENT)
    kept = random_classification_metrics()
    kept_id = log_classification("resnet18", "pw", 32, 0, kept)
    running_id = log_classification("resnet18", "pw", 32, 1, random_classification_metrics(), status="RUNNING")
    failed_id = log_classification("resnet18", "pw", 32, 2, random_classification_metrics(), status="FAILED")
    without_f1 = {k: v for k, v in random_classification_metrics().items() if k != "test_f1"}
    missing_id = log_classification("resnet18", "pw", 32, 3, without_f1)
    nan_id = log_classification("resnet18", "pw", 32, 4, {**random_classification_metrics(), "test_precision": float("nan")})
    no_class_id = log_classification("resnet18", "pw", 32, 5, {k: v for k, v in random_classification_metrics().items() if not k.endswith("tumour")})
    older_id = log_classification("resnet18", "pw", 32, 0, random_classification_metrics(), config_key="repeated")
    newer = random_classification_metrics()
    newer_id = log_classification("resnet18", "pw", 32, 7, newer, config_key="repeated")

    result = compare(EXPERIMENT, tmp_path / "out", log_run=False)
    reasons = {run.run_id: run.reason for run in result.run_table.left_out}

    assert set(result.run_table.runs["run_id"]) == {kept_id, newer_id}
    assert "RUNNING" in reasons[running_id]
    assert "FAILED" in reasons[failed_id]
    assert "test_f1" in reasons[missing_id]
    assert "test_precision" in reasons[nan_id]
    assert "test_class_accuracy_tumour" in reasons[no_class_id]
    assert newer_id in reasons[older_id]
    row = cell(result.tables[0].cells, metric="F1", model="resnet18", granularity="pw", patch_size=32)
    assert row["n"] == 2
    assert row["mean"] == pytest.approx(50 * (kept["test_f1"] + newer["test_f1"]))
    listed = pd.read_csv(tmp_path / "out" / "left_out_runs.csv")
    assert set(listed["run_id"]) == {running_id, failed_id, missing_id, nan_id, no_class_id, older_id}


def test_read_runs_pages_through_all(store):
    mlflow.set_experiment(EXPERIMENT)
    ids = {log_classification("resnet18", "el", 32, seed, random_classification_metrics()) for seed in range(5)}
    client = MlflowClient()

    table = read_runs(client, find_experiment_id(client, EXPERIMENT), page_size=2)
    assert set(table.runs["run_id"]) == ids


def test_compare_writes_files_and_logs_run(logged, tmp_path):
    parent_id, _ = logged
    out = tmp_path / "report"
    result = compare(EXPERIMENT, out, study_run_id=parent_id)

    for name in ("table2_classification", "table3_class_accuracy", "table4_segmentation", "improvement", "published"):
        for suffix in ("md", "csv", "html"):
            assert (out / f"{name}.{suffix}").stat().st_size > 0, f"{name}.{suffix}"
    for figure in ("fig3.png", "fig4.png"):
        with Image.open(out / figure) as image:
            assert image.size[0] > 100
    run = MlflowClient().get_run(result.compare_run_id)
    assert run.data.tags["task"] == "compare"
    assert run.info.status == "FINISHED"
    artifacts = {info.path for info in MlflowClient().list_artifacts(result.compare_run_id)}
    assert {"table2_classification.md", "fig3.png", "fig4.png", "published.csv"} <= artifacts
    assert "no finished segmentation run" not in " ".join(result.notes)
    assert any("logged no predictions" in note for note in result.notes)


def test_markdown_marks_best_cell(logged, tmp_path):
    parent_id, values = logged
    compare(EXPERIMENT, tmp_path / "out", study_run_id=parent_id, log_run=False)
    text = (tmp_path / "out" / "table4_segmentation.md").read_text()

    dice = values[(values["task"] == "segmentation") & (values["model"] == "unet")].groupby("granularity")["test_dice"].mean()
    best = dice.idxmax()
    unet_best_line = next(line for line in text.splitlines() if line.startswith(f"| unet | {best} |"))
    assert f"**{dice[best]:.2f} ± " in unet_best_line


def test_published_tables_cite_paper(tmp_path, store):
    mlflow.set_experiment(EXPERIMENT)
    log_classification("resnet18", "pw", 32, 0, random_classification_metrics())
    compare(EXPERIMENT, tmp_path / "out", log_run=False)

    published = pd.read_csv(tmp_path / "out" / "published.csv")
    vgg = published[(published["table"] == "table2") & (published["model"] == "VGG16") & (published["patch_size"] == 32)]
    assert vgg[(vgg["metric"] == "F1") & (vgg["granularity"] == "pw")]["mean"].item() == 92.14
    unet = published[(published["table"] == "table4") & (published["model"] == "UNet") & (published["granularity"] == "bd")]
    assert unet[unet["metric"] == "Dice"]["mean"].item() == 0.86
    text = (tmp_path / "out" / "published.md").read_text()
    assert "Effects of annotation granularity in deep learning models for histopathological images" in text
    assert "STUDY.md" not in text


def write_mask(path, values):
    Image.fromarray(np.asarray(values, dtype=np.uint8)).save(path)


def test_fig4_uses_logged_masks(store, tmp_path):
    mlflow.set_experiment(EXPERIMENT)
    folder = tmp_path / "artifacts"
    folder.mkdir()
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:16, 8:16] = 1
    write_mask(folder / "region_a.png", mask)
    image = (np.random.default_rng(0).uniform(0, 255, (32, 32, 3))).astype(np.uint8)
    Image.fromarray(image).save(folder / "region_a_image.png")

    for granularity in ("pw", "el", "bd"):
        run_id = log_segmentation("unet", granularity, 0, random_segmentation_metrics())
        client = MlflowClient()
        client.log_artifact(run_id, str(folder / "region_a.png"), "predictions")
        if granularity == "pw":
            (folder / "images").mkdir(exist_ok=True)
            (folder / "truth").mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / "images" / "region_a.png")
            write_mask(folder / "truth" / "region_a.png", mask)
            client.log_artifact(run_id, str(folder / "images" / "region_a.png"), "images")
            client.log_artifact(run_id, str(folder / "truth" / "region_a.png"), "truth")

    result = compare(EXPERIMENT, tmp_path / "out", log_run=False)
    assert result.notes == []
    with Image.open(tmp_path / "out" / "fig4.png") as figure:
        assert figure.size[0] > 300


def test_cli_empty_experiment_exits_2(store, tmp_path, capsys):
    MlflowClient().create_experiment("empty")
    assert main(["compare", "--experiment", "empty", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "no finished classification or segmentation runs" in error
    assert "granularity study" in error


def test_cli_unknown_experiment_exits_2(store, tmp_path, capsys):
    assert main(["compare", "--experiment", "absent", "--out", str(tmp_path / "out")]) == 2
    assert "experiment 'absent' not found" in capsys.readouterr().err


def test_cli_unknown_study_exits_2(store, tmp_path, capsys):
    mlflow.set_experiment(EXPERIMENT)
    log_classification("resnet18", "pw", 32, 0, random_classification_metrics())
    assert main(["compare", "--experiment", EXPERIMENT, "--study", "0123456789abcdef0123456789abcdef", "--out", str(tmp_path / "out")]) == 2
    assert "study run '0123456789abcdef0123456789abcdef' not found" in capsys.readouterr().err


def test_cli_prints_tables(logged, tmp_path, capsys):
    parent_id, _ = logged
    assert main(["compare", "--experiment", EXPERIMENT, "--study", parent_id, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "Table II" in printed
    assert "Table IV" in printed
    assert "Improvement of pixel-wise annotation" in printed
