"""Fig. 4 of the study: image, pixel-wise truth and the predictions of the pw, el and bd models for a few test regions.

Predictions come from the artifacts ``predictions/<region name>.png`` that
``segment`` logs (uint8 class masks, 0 background, class index + 1). The
image and the truth come from artifacts of the same run where it logged them
(``images/``, ``inputs/`` and ``truth/``, ``ground_truth/``), else from the
dataset named by the run's ``dataset``, ``format`` and ``class_map``
parameters. A panel whose source is missing shows why, and the reason is
returned as a note, so the figure degrades instead of failing.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from granularity.data.images import load_label_image, load_rgb
from granularity.errors import UserError
from granularity.report.figures import load_pyplot

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
IMAGE_DIRS = ("images", "inputs")
TRUTH_DIRS = ("truth", "ground_truth")
PANEL_GRANULARITIES = ("pw", "el", "bd")
MAX_RUNS_SEARCHED = 2
GRANULARITY_LABELS = {"pw": "pixel-wise (pw)", "el": "ellipse (el)", "bd": "bounding box (bd)"}
FALLBACK_PALETTE = np.array(
    [(0, 0, 0), (255, 255, 255), (255, 48, 48), (255, 215, 0), (48, 192, 48), (48, 96, 255), (200, 80, 255)], dtype=np.uint8
)


@dataclass
class RegionPanels:
    """The pictures of one region row; None where nothing was found."""

    name: str
    image: np.ndarray | None = None
    truth: np.ndarray | None = None
    predictions: dict[str, np.ndarray | None] = field(default_factory=dict)


# Regions read from a dataset folder for fig4, by dataset path, so one compare reads each dataset once.
_REGION_CACHE: dict[str, dict] = {}

# A region source returns (image, truth class mask) of a named region of the run's dataset, either possibly None.
RegionSource = Callable[[dict, str], tuple[np.ndarray | None, np.ndarray | None]]


def _numeric_seed(seed) -> tuple:
    try:
        return (0, float(seed))
    except (TypeError, ValueError):
        return (1, str(seed))


def choose_runs(client, segmentation_runs: pd.DataFrame) -> tuple[str | None, dict[str, str]]:
    """Pick the model whose runs logged predictions at the most granularities and, per granularity, its lowest seed.

    Runs with prediction masks are preferred over runs without, so one run
    that lacks them does not empty a panel another seed could fill. The
    search stops at the first model with masks at every granularity.
    """
    best: tuple[int, int, str | None, dict[str, str]] = (-1, -1, None, {})
    coverage = segmentation_runs.groupby("model")["granularity"].nunique()
    models = sorted(coverage.index, key=lambda model: (-coverage[model], str(model)))
    for model in models:
        model_runs = segmentation_runs[segmentation_runs["model"] == model]
        chosen, with_predictions = {}, 0
        for granularity, group in model_runs.groupby("granularity"):
            ordered = sorted(group.itertuples(index=False), key=lambda run: _numeric_seed(run.seed))
            # A few seeds are enough to find logged masks; listing the artifacts of a run costs a request.
            logged = next(
                (run for run in ordered[:MAX_RUNS_SEARCHED] if _artifact_names(client, run.run_id, PREDICTIONS_DIR, getattr(run, "artifact_uri", None))),
                None,
            )
            chosen[granularity] = (logged or ordered[0]).run_id
            with_predictions += logged is not None
        if (with_predictions, len(chosen)) > best[:2]:
            best = (with_predictions, len(chosen), model, chosen)
        if with_predictions == len(PANEL_GRANULARITIES):
            break
    return best[2], best[3]


def _artifact_names(client, run_id: str, folder: str, artifact_uri: str | None = None) -> dict[str, str]:
    """Return region name -> artifact path of the image files directly under ``folder`` of the run.

    With the run's ``artifact_uri`` the folder is listed directly. Without it,
    ``client.list_artifacts`` reads the run from the tracking store first,
    which costs one query per run.
    """
    if isinstance(artifact_uri, str) and artifact_uri:
        from mlflow.artifacts import list_artifacts

        listed = list_artifacts(artifact_uri=f"{artifact_uri.rstrip('/')}/{folder}", tracking_uri=client.tracking_uri)
    else:
        listed = client.list_artifacts(run_id, folder)
    names = {}
    for info in listed:
        if not info.is_dir and info.path.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff")):
            names[Path(info.path).stem] = info.path
    return names


def _download(client, run_id: str, artifact_path: str, folder: Path) -> Path:
    return Path(client.download_artifacts(run_id, artifact_path, str(folder)))


def _class_map_of(params: dict):
    from granularity.data.class_map import ClassMap

    path = params.get("class_map")
    if not path:
        return None
    try:
        return ClassMap.load(path)
    except (UserError, OSError) as error:
        logger.info("class map %s of the segmentation runs cannot be loaded (%s); fig4 uses a generic palette", path, error)
        return None


def dataset_region_source(params: dict, name: str):
    """Read ``name`` from the dataset of the run's parameters; return (None, None) when that is not possible."""
    from granularity.data.class_map import ClassMap
    from granularity.data.readers import read_regions

    root, data_format, class_map_path = params.get("dataset"), params.get("format"), params.get("class_map")
    if not (root and class_map_path and Path(root).exists()):
        return None, None
    regions = _REGION_CACHE.get(root)
    if regions is None:
        try:
            # NOTE: the readers return the whole dataset; it is cached per path so one compare reads it once.
            found = read_regions(root, data_format if data_format not in (None, "", "auto") else None, ClassMap.load(class_map_path))
        except (UserError, OSError) as error:
            logger.info("dataset %s cannot be read for fig4 (%s)", root, error)
            return None, None
        regions = _REGION_CACHE[root] = {region.name: region for region in found}
    region = regions.get(name)
    if region is None:
        return None, None
    return region.image, region.class_map_image()


def collect_panels(client, chosen: dict[str, str], max_regions: int, region_source: RegionSource | None, work_dir: Path) -> tuple[list[RegionPanels], list[str], dict]:
    """Download the predictions, images and truths of up to ``max_regions`` regions; return panels, notes and run params."""
    notes: list[str] = []
    predictions = {g: _artifact_names(client, run_id, PREDICTIONS_DIR) for g, run_id in chosen.items()}
    for granularity in PANEL_GRANULARITIES:
        if granularity not in chosen:
            notes.append(f"no finished segmentation run at granularity {granularity}")
        elif not predictions[granularity]:
            notes.append(f"run {chosen[granularity]} ({granularity}) logged no {PREDICTIONS_DIR}/<region name>.png masks")

    available = [set(names) for names in predictions.values() if names]
    if not available:
        return [], notes, {}
    # Regions predicted at every granularity come first, so a row is as complete as the runs allow.
    common = set.intersection(*available)
    names = sorted(common) + sorted(set.union(*available) - common)
    names = names[:max_regions]

    reference_run = chosen.get("pw") or next(iter(chosen.values()))
    params = client.get_run(reference_run).data.params
    image_files = {d: _artifact_names(client, reference_run, d) for d in IMAGE_DIRS}
    truth_files = {d: _artifact_names(client, reference_run, d) for d in TRUTH_DIRS}

    panels = []
    for name in names:
        row = RegionPanels(name)
        for granularity in PANEL_GRANULARITIES:
            path = predictions.get(granularity, {}).get(name)
            row.predictions[granularity] = load_label_image(_download(client, chosen[granularity], path, work_dir)) if path else None

        image_path = next((files[name] for files in image_files.values() if name in files), None)
        truth_path = next((files[name] for files in truth_files.values() if name in files), None)
        if image_path:
            row.image = load_rgb(_download(client, reference_run, image_path, work_dir))
        if truth_path:
            row.truth = load_label_image(_download(client, reference_run, truth_path, work_dir))
        if (row.image is None or row.truth is None) and region_source is not None:
            image, truth = region_source(params, name)
            row.image = row.image if row.image is not None else image
            row.truth = row.truth if row.truth is not None else truth
        panels.append(row)

    if any(row.image is None for row in panels):
        notes.append("input images were neither logged nor readable from the dataset path of the runs")
    if any(row.truth is None for row in panels):
        notes.append("truth masks were neither logged nor readable from the dataset path of the runs")
    return panels, notes, params


def _colorize(mask: np.ndarray, class_map) -> np.ndarray:
    if class_map is not None:
        from granularity.data.visualize import colorize

        return colorize(mask, class_map)
    return FALLBACK_PALETTE[np.clip(mask, 0, len(FALLBACK_PALETTE) - 1)]


def _draw(axis, picture: np.ndarray | None, title: str, missing: str) -> None:
    if picture is None:
        axis.text(0.5, 0.5, missing, ha="center", va="center", wrap=True, fontsize=8)
    else:
        axis.imshow(picture)
    axis.set_title(title, fontsize=9)
    axis.set_axis_off()


def plot_fig4(client, segmentation_runs: pd.DataFrame, path: Path, max_regions: int = 3, region_source: RegionSource | None = dataset_region_source) -> list[str]:
    """Draw Fig. 4 into ``path`` and return the notes about what was missing (empty when every panel is filled)."""
    plt = load_pyplot()
    model, chosen = choose_runs(client, segmentation_runs)
    with tempfile.TemporaryDirectory(prefix="fig4-") as work:
        panels, notes, params = collect_panels(client, chosen, max_regions, region_source, Path(work)) if chosen else ([], ["no finished segmentation runs"], {})
    class_map = _class_map_of(params) if params else None

    rows = max(len(panels), 1)
    figure, axes = plt.subplots(rows, 2 + len(PANEL_GRANULARITIES), figsize=(3.0 * (2 + len(PANEL_GRANULARITIES)), 3.1 * rows + 0.8), squeeze=False)
    if not panels:
        for axis in axes[0]:
            axis.set_axis_off()
        axes[0, 2].text(0.5, 0.5, "no prediction masks logged:\n" + "\n".join(notes), ha="center", va="center", fontsize=9)

    for axis_row, row in zip(axes, panels):
        _draw(axis_row[0], row.image, f"{row.name}\nimage", "image not logged")
        _draw(axis_row[1], None if row.truth is None else _colorize(row.truth, class_map), "truth (pixel-wise)", "truth not logged")
        for axis, granularity in zip(axis_row[2:], PANEL_GRANULARITIES):
            mask = row.predictions.get(granularity)
            picture = None if mask is None else _colorize(mask, class_map)
            _draw(axis, picture, f"trained on {GRANULARITY_LABELS[granularity]}", f"no {granularity} prediction logged")

    if class_map is not None:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=np.array(c.color) / 255, edgecolor="grey", label=c.name) for c in class_map.classes]
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    model_text = f" ({model})" if model else ""
    figure.suptitle(f"Fig. 4. Test regions: image, pixel-wise truth and predictions of models trained on pw, el and bd{model_text}")
    figure.tight_layout(rect=(0, 0.04, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)

    for note in notes:
        logger.warning("fig4: %s", note)
    return notes
