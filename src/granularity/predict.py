"""Apply a logged segmentation model to new images: class masks, colour overlays and QuPath GeoJSON."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from granularity.data.class_map import ClassMap
from granularity.data.geojson_writer import write_geojson
from granularity.data.images import load_rgb
from granularity.data.visualize import overlay
from granularity.errors import DatasetError, UserError
from granularity.metrics.segmentation import label_instances
from granularity.models.tiling import check_tile_size, predict_class_mask
from granularity.training.device import resolve_device
from granularity.training.segmentation import CLASS_MAP_FILE, SEGMENTER_FILE

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# Window size for models trained on whole regions, which logged no tile size.
DEFAULT_TILE_SIZE = 512


@dataclass
class LoadedSegmenter:
    """A logged segmentation model with the class map and settings logged beside it."""

    model: nn.Module
    class_map: ClassMap
    settings: dict[str, Any]
    uri: str


@dataclass
class PredictionFiles:
    """The files written for one image, and its nucleus count."""

    image: Path
    mask: Path
    overlay: Path
    geojson: Path
    nuclei: int


def load_segmenter(model_uri: str, device: torch.device | str = "cpu") -> LoadedSegmenter:
    """Download a model logged by ``granularity segment`` (``runs:/...`` or ``models:/...``) and load it.

    Raises UserError when the URI does not resolve or the model was not logged
    by a segmentation run (no class map beside it).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as error:
        raise UserError(
            f"model {model_uri} cannot be loaded from tracking URI {mlflow.get_tracking_uri()} ({error}); "
            "pass runs:/<run id>/model of a segment run, or models:/<name>/<version>"
        ) from error

    class_map_files = sorted(local.rglob(CLASS_MAP_FILE))
    settings_files = sorted(local.rglob(SEGMENTER_FILE))
    if not class_map_files or not settings_files:
        raise UserError(f"model {model_uri} has no {CLASS_MAP_FILE} and {SEGMENTER_FILE}; pass a model logged by 'granularity segment'")
    class_map = ClassMap.from_dict(json.loads(class_map_files[0].read_text()), str(class_map_files[0]))
    settings = json.loads(settings_files[0].read_text())

    model = mlflow.pytorch.load_model(str(local), map_location=torch.device(device))
    model.eval()
    logger.info("loaded %s %s model with classes %s from %s", settings.get("model"), settings.get("encoder"), class_map.names, model_uri)
    return LoadedSegmenter(model=model, class_map=class_map, settings=settings, uri=model_uri)


def list_images(folder: Path) -> list[Path]:
    """Return the images directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} not found; pass --images pointing to a folder of PNG, JPEG or TIFF images")
    images = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"image folder {folder} contains no {', '.join(IMAGE_SUFFIXES)} files; pass the folder that contains the images")
    return images


def predict_image(segmenter: LoadedSegmenter, image: np.ndarray, *, tile_size: int, batch_size: int, device: torch.device) -> np.ndarray:
    """Return the H x W uint8 class mask of one RGB image of any size."""
    return predict_class_mask(segmenter.model, image, tile_size=tile_size, batch_size=batch_size, device=device, amp=device.type == "cuda")


def write_prediction(out_dir: Path, stem: str, image: np.ndarray, class_mask: np.ndarray, class_map: ClassMap, source: Path) -> PredictionFiles:
    """Write ``<stem>_mask.png``, ``<stem>_overlay.png`` and ``<stem>.geojson`` into ``out_dir``."""
    mask_path = out_dir / f"{stem}_mask.png"
    overlay_path = out_dir / f"{stem}_overlay.png"
    geojson_path = out_dir / f"{stem}.geojson"

    picture = cv2.cvtColor(overlay(image, class_mask, class_map), cv2.COLOR_RGB2BGR)
    for path, pixels in ((mask_path, class_mask), (overlay_path, picture)):
        if not cv2.imwrite(str(path), pixels):
            raise UserError(f"cannot write {path}; check that --out points to a writable folder")
    nuclei = write_geojson(geojson_path, label_instances(class_mask), class_mask, class_map)
    return PredictionFiles(image=source, mask=mask_path, overlay=overlay_path, geojson=geojson_path, nuclei=nuclei)


def predict_folder(
    model_uri: str,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    tile_size: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
) -> list[PredictionFiles]:
    """Predict every image in ``images_dir`` with a logged segmenter and write its files into ``out_dir``."""
    images = list_images(Path(images_dir))
    torch_device = resolve_device(device)
    segmenter = load_segmenter(model_uri, torch_device)
    tile_size = tile_size or int(segmenter.settings.get("tile_size") or 0) or DEFAULT_TILE_SIZE
    check_tile_size(tile_size)

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out_dir} ({error}); pass a writable --out") from error

    written = []
    for path in tqdm(images, desc="predicting", unit="image"):
        image = load_rgb(path)
        class_mask = predict_image(segmenter, image, tile_size=tile_size, batch_size=batch_size, device=torch_device)
        written.append(write_prediction(out_dir, path.stem, image, class_mask, segmenter.class_map, path))
    logger.info("predicted %d images into %s (%d nuclei)", len(written), out_dir, sum(item.nuclei for item in written))
    return written
