"""Segmentation task: train a UNet, FPN or LinkNet on one granularity's class masks and log it to MLflow.

The study runner and ``granularity segment`` both call :func:`run_segmentation`.
Training, checkpoints, resume and the MLflow run context are shared with
classification (``training/loop.py``, ``training/checkpoint.py``,
``tracking/run.py``). This module adds what is specific to segmentation:
region data, the loss, validation Dice, test metrics and prediction artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from granularity.data.class_map import ClassMap
from granularity.data.granularity import GRANULARITIES
from granularity.data.prepared import PreparedDataset, prepare_dataset
from granularity.errors import ConfigError, DatasetError, UserError
from granularity.metrics.segmentation import SegmentationMetrics
from granularity.models.segmenters import ARCHITECTURES, build_segmenter
from granularity.models.tiling import (
    IGNORE_INDEX,
    check_tile_size,
    image_to_tensor,
    pad_image,
    pad_mask,
    padded_size,
    predict_class_mask,
)
from granularity.tracking import keys
from granularity.tracking.run import TrackedRun, load_run_config, tracked_run
from granularity.tracking.uri import DEFAULT_EXPERIMENT
from granularity.training.checkpoint import CHECKPOINT_ROOT, load_checkpoint, local_checkpoints
from granularity.training.device import loader_options, resolve_device, seed_everything
from granularity.training.loop import FitOptions, fit

logger = logging.getLogger(__name__)

TASK = "segmentation"
LOSSES = ("ce", "ce_dice")
SPLITS = ("region",)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# Artifact names that ``granularity predict`` reads back next to the logged model.
MODEL_ARTIFACT = "model"
CLASS_MAP_FILE = "class_map.json"
SEGMENTER_FILE = "segmenter.json"

# Regions are padded to at least this size for training: at 32 pixels the encoder's
# last stage is 1 x 1, and BatchNorm cannot train on one value per channel.
MIN_TRAINING_SIDE = 64

# Colour overlays are logged for this many test regions; the masks for all of them.
OVERLAY_REGIONS = 4

DEFAULTS: dict[str, Any] = {
    "dataset": None,
    "format": None,
    "class_map": None,
    "granularity": "pw",
    "model": "unet",
    "encoder": "resnet18",
    "pretrained": "imagenet",
    "epochs": 20,
    "batch_size": 8,
    "lr": 1e-3,
    "seed": 0,
    "split": "region",
    "tile_size": 0,
    "loss": "ce",
    "max_regions": 0,
    "device": "auto",
    "num_workers": 0,
    "early_stopping": 0,
    "experiment": DEFAULT_EXPERIMENT,
}


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` completed with defaults and checked; raise ConfigError on an invalid value."""
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown segmentation options {unknown}; valid options are {sorted(DEFAULTS)}")
    resolved = {**DEFAULTS, **{key: value for key, value in config.items() if value is not None}}

    for key in ("dataset", "class_map"):
        if not resolved[key]:
            raise ConfigError(f"segmentation needs '{key}'; pass --{key.replace('_', '-')}")
    for key in ("epochs", "batch_size", "seed", "tile_size", "max_regions", "num_workers", "early_stopping"):
        resolved[key] = int(resolved[key])
    resolved["lr"] = float(resolved["lr"])
    for key in ("dataset", "class_map", "pretrained", "format"):
        if resolved[key] is not None:
            resolved[key] = str(resolved[key])

    choices = {"granularity": GRANULARITIES, "model": tuple(ARCHITECTURES), "loss": LOSSES, "split": SPLITS}
    for key, allowed in choices.items():
        if resolved[key] not in allowed:
            raise ConfigError(f"invalid {key} {resolved[key]!r}; use one of {', '.join(allowed)}")
    for key in ("epochs", "batch_size"):
        if resolved[key] < 1:
            raise ConfigError(f"invalid {key} {resolved[key]}; use a positive number")
    for key in ("max_regions", "early_stopping"):
        if resolved[key] < 0:
            raise ConfigError(f"invalid {key} {resolved[key]}; use 0 (off) or a positive number")
    if not resolved["lr"] > 0:
        raise ConfigError(f"invalid lr {resolved['lr']}; use a positive learning rate such as 0.001")
    if resolved["tile_size"]:
        check_tile_size(resolved["tile_size"])
    return resolved


# ----------------------------------------------------------------------------- data


@dataclass
class RegionSplit:
    """Indices into the prepared dataset's regions for each subset."""

    train: list[int]
    val: list[int]
    test: list[int]


def select_regions(prepared: PreparedDataset, max_regions: int, seed: int) -> list[int]:
    """Return the indices of the regions to use: all, or a seeded random ``max_regions`` of them."""
    indices = list(range(len(prepared.regions)))
    if max_regions and max_regions < len(indices):
        rng = np.random.default_rng(seed)
        indices = sorted(rng.choice(indices, size=max_regions, replace=False).tolist())
    return indices


def split_regions(prepared: PreparedDataset, indices: list[int], seed: int) -> RegionSplit:
    """Split ``indices`` into train, validation and test regions so that no group spans two subsets."""
    from granularity.data.splits import split_by_group

    groups = [prepared.regions[i].group for i in indices]
    subsets = split_by_group(groups, SPLIT_FRACTIONS, seed)
    split = RegionSplit(*([indices[k] for k in subsets[name]] for name in ("train", "val", "test")))
    for name in ("train", "val", "test"):
        if not getattr(split, name):
            raise DatasetError(
                f"the {name} split of {prepared.name} is empty ({len(set(groups))} groups in {len(indices)} regions); "
                "use more regions (--max-regions 0) or a dataset with at least 3 groups"
            )
    return split


def check_masks(prepared: PreparedDataset, granularity: str, indices: Iterable[int]) -> None:
    """Raise a DatasetError naming the region whose class mask contains a value outside the class map."""
    num_classes = prepared.class_map.num_classes
    for index in indices:
        mask = prepared.maps[index].class_maps[granularity]
        if mask.size and int(mask.max()) > num_classes:
            region = prepared.regions[index]
            raise DatasetError(
                f"region {region.name} ({region.source or prepared.name}): class mask value {int(mask.max())} is outside "
                f"class map {prepared.class_map.path} ({num_classes} classes); fix the labels or use the matching --class-map"
            )


def warn_absent_classes(prepared: PreparedDataset, granularity: str, train: list[int]) -> list[str]:
    """Log a warning naming every class without a pixel in the training regions; return those names."""
    present = set()
    for index in train:
        present.update(np.unique(prepared.maps[index].class_maps[granularity]).tolist())
    absent = [name for position, name in enumerate(prepared.class_map.names) if position + 1 not in present]
    if absent:
        logger.warning(
            "classes %s have no pixels in the %d training regions at granularity %s; training anyway, "
            "their test scores will show what the model does without examples",
            absent,
            len(train),
            granularity,
        )
    return absent


class RegionDataset(Dataset):
    """Image and class-mask tensors of whole regions or random tiles of them.

    Items are padded to a multiple of 32 (and at least ``MIN_TRAINING_SIDE``);
    padded mask pixels hold ``IGNORE_INDEX`` so the loss and validation skip them.
    """

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], tile_size: int = 0, augmentation=None):
        self.images = images
        self.masks = masks
        self.tile_size = tile_size
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.images)

    def _random_tile(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = mask.shape
        size = self.tile_size
        # np.random is seeded per run and per loader worker, and checkpoints store its state.
        top = np.random.randint(0, height - size + 1) if height > size else 0
        left = np.random.randint(0, width - size + 1) if width > size else 0
        return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.tile_size:
            image, mask = self._random_tile(image, mask)
        if self.augmentation is not None:
            image, mask = self.augmentation(image, mask)

        height = max(MIN_TRAINING_SIDE, padded_size(mask.shape[0]))
        width = max(MIN_TRAINING_SIDE, padded_size(mask.shape[1]))
        image = pad_image(np.ascontiguousarray(image), height, width)
        mask = pad_mask(np.ascontiguousarray(mask), height, width, fill=IGNORE_INDEX)
        return image_to_tensor(image), torch.from_numpy(mask.astype(np.int64))


def collate_regions(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items of different sizes, padding each to the largest (image 0, mask ``IGNORE_INDEX``)."""
    height = max(image.shape[1] for image, _ in items)
    width = max(image.shape[2] for image, _ in items)
    images = torch.zeros((len(items), 3, height, width))
    masks = torch.full((len(items), height, width), IGNORE_INDEX, dtype=torch.int64)
    for position, (image, mask) in enumerate(items):
        images[position, :, : image.shape[1], : image.shape[2]] = image
        masks[position, : mask.shape[0], : mask.shape[1]] = mask
    return images, masks


def _augmentation(seed: int):
    """Return the study's augmentation (dihedral variants and colour jitter) for image and mask."""
    from granularity.data.augment import StudyAugmentation

    return StudyAugmentation(seed)


# ----------------------------------------------------------------------------- loss and validation


def build_loss(name: str) -> nn.Module:
    """Return cross-entropy, or cross-entropy plus multiclass Dice loss, both skipping padded pixels."""
    cross_entropy = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    if name == "ce":
        return cross_entropy

    from segmentation_models_pytorch.losses import DiceLoss

    dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)

    class CrossEntropyDice(nn.Module):
        def forward(self, logits, target):
            return cross_entropy(logits, target) + dice(logits, target)

    return CrossEntropyDice()


def make_train_step(criterion: nn.Module):
    def train_step(model: nn.Module, batch) -> torch.Tensor:
        images, masks = batch
        return criterion(model(images), masks)

    return train_step


def make_evaluate(criterion: nn.Module):
    """Return the validation function: mean loss per image and nucleus-versus-background Dice from summed pixels."""

    def evaluate(model: nn.Module, batches) -> dict[str, float]:
        loss_sum = 0.0
        images = 0
        counts = torch.zeros(3, dtype=torch.float64)  # both nucleus, truth nucleus, predicted nucleus
        for batch_images, masks in batches:
            logits = model(batch_images).float()
            loss_sum += float(criterion(logits, masks)) * batch_images.shape[0]
            images += batch_images.shape[0]

            valid = masks != IGNORE_INDEX
            predicted = (logits.argmax(dim=1) > 0) & valid
            truth = (masks > 0) & valid
            counts += torch.stack([(predicted & truth).sum(), truth.sum(), predicted.sum()]).double().cpu()
        denominator = float(counts[1] + counts[2])
        return {
            "val_loss": loss_sum / max(images, 1),
            "val_dice": 2 * float(counts[0]) / denominator if denominator > 0 else math.nan,
        }

    return evaluate


# ----------------------------------------------------------------------------- test and artifacts


def inference_tile_size(config: Mapping[str, Any], shape: tuple[int, int]) -> int:
    """Return the sliding-window tile: the training tile, or the whole padded region without one."""
    if config["tile_size"]:
        return int(config["tile_size"])
    return max(padded_size(shape[0]), padded_size(shape[1]))


def evaluate_test_regions(
    model: nn.Module,
    prepared: PreparedDataset,
    test: list[int],
    config: Mapping[str, Any],
    device: torch.device,
) -> tuple[dict[str, float], dict[int, np.ndarray]]:
    """Predict every test region; return ``test_*`` and ``own_test_*`` metrics and the predicted class masks."""
    class_map = prepared.class_map
    truth_metrics = SegmentationMetrics(class_map.names, class_map.tumour_indices)
    own_metrics = SegmentationMetrics(class_map.names, class_map.tumour_indices)
    granularity = config["granularity"]

    predictions = {}
    for index in tqdm(test, desc="test regions", unit="region", leave=False):
        region, maps = prepared.regions[index], prepared.maps[index]
        prediction = predict_class_mask(
            model,
            region.image,
            tile_size=inference_tile_size(config, region.shape),
            batch_size=config["batch_size"],
            device=device,
            amp=device.type == "cuda",
        )
        predictions[index] = prediction
        truth_metrics.update(prediction, maps.class_maps["pw"], maps.instance_maps["pw"])
        own_metrics.update(prediction, maps.class_maps[granularity], maps.instance_maps[granularity])

    metrics = {f"test_{key}": value for key, value in truth_metrics.compute().items()}
    metrics.update({f"own_test_{key}": value for key, value in own_metrics.compute().items()})
    return metrics, predictions


def _figure_region(prepared: PreparedDataset, test: list[int]) -> int:
    """Pick the test region that shows the most classes, then the most nuclei."""
    return max(test, key=lambda index: (len(set(prepared.maps[index].nucleus_classes.tolist())), len(prepared.maps[index].nucleus_ids)))


def log_prediction_artifacts(run: TrackedRun, prepared: PreparedDataset, predictions: dict[int, np.ndarray], folder: Path) -> None:
    """Log every predicted mask as ``predictions/<region>.png``, a few overlays and a figure like the study's Fig. 4."""
    from granularity.data.visualize import annotation_figure, overlay

    masks_dir = folder / "predictions"
    overlays_dir = folder / "overlays"
    masks_dir.mkdir(parents=True, exist_ok=True)
    overlays_dir.mkdir(parents=True, exist_ok=True)

    # Masks hold 0 for background and class index + 1, as ``prepare --export`` writes them.
    for index, prediction in predictions.items():
        path = masks_dir / f"{prepared.regions[index].name}.png"
        if not cv2.imwrite(str(path), prediction):
            raise UserError(f"cannot write {path}; check free space in the temporary folder")
    for index in list(predictions)[:OVERLAY_REGIONS]:
        region = prepared.regions[index]
        picture = overlay(region.image, predictions[index], prepared.class_map)
        cv2.imwrite(str(overlays_dir / f"{region.name}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    run.log_artifact(masks_dir)
    run.log_artifact(overlays_dir)

    chosen = _figure_region(prepared, list(predictions))
    maps = prepared.maps[chosen]
    panels = {granularity: maps.class_maps[granularity] for granularity in GRANULARITIES}
    panels["prediction"] = predictions[chosen]
    figure = annotation_figure(prepared.regions[chosen].image, panels, prepared.class_map, title=prepared.regions[chosen].name)
    run.log_figure(figure, "figures/segmentation_example.png")

    import matplotlib.pyplot as plt

    plt.close(figure)


def log_segmenter(model: nn.Module, class_map: ClassMap, config: Mapping[str, Any], folder: Path) -> None:
    """Log the model with a tensor signature, its class map and the settings ``granularity predict`` needs."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    folder.mkdir(parents=True, exist_ok=True)
    class_map_path = folder / CLASS_MAP_FILE
    class_map_path.write_text(json.dumps(class_map.to_dict(), indent=2))
    settings_path = folder / SEGMENTER_FILE
    settings = {key: config[key] for key in ("model", "encoder", "granularity", "tile_size")}
    settings["num_classes"] = class_map.num_classes + 1
    settings["input"] = "N x 3 x H x W float32, RGB scaled to [0, 1] and ImageNet-normalised; H and W multiples of 32"
    settings_path.write_text(json.dumps(settings, indent=2))

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, class_map.num_classes + 1, -1, -1))]),
    )
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT,
        signature=signature,
        # torch.export ("pt2") fixes the input size at tracing; a pickled module takes regions of any size.
        serialization_format="pickle",
        extra_files=[str(class_map_path), str(settings_path)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "segmentation-models-pytorch==0.6.0"],
    )
    # A copy beside the model, so a run's class map is one click away in the UI.
    mlflow.log_artifact(str(class_map_path))


def region_table(prepared: PreparedDataset, split: RegionSplit, granularity: str) -> pd.DataFrame:
    """Return one row per used region: name, group, subset, size and nucleus count."""
    rows = []
    for subset in ("train", "val", "test"):
        for index in getattr(split, subset):
            region = prepared.regions[index]
            rows.append(
                {
                    "region": region.name,
                    "group": region.group,
                    "subset": subset,
                    "height": region.shape[0],
                    "width": region.shape[1],
                    "nuclei": int(len(prepared.maps[index].nucleus_ids)),
                    "granularity": granularity,
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the run


def _run_config(config: Mapping[str, Any], resume_run_id: str | None) -> dict[str, Any]:
    """Return the configuration to run: the given one, or the resumed run's with the new execution options."""
    if not resume_run_id:
        return resolve_config(config)
    logged = load_run_config(resume_run_id, task=TASK)
    for key in keys.EXECUTION_OPTIONS & set(DEFAULTS):
        if config.get(key) is not None:
            logged[key] = config[key]
    return resolve_config(logged)


def run_segmentation(
    config: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    epoch_callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> str:
    """Train and test one segmentation configuration in an MLflow run; return the run id.

    ``config`` contains the keys of ``DEFAULTS``. With ``resume_run_id`` the run's
    own logged configuration is used (execution options such as ``device``
    may change) and training continues after its last checkpoint.
    ``epoch_callback(epoch, metrics)`` is called after every epoch (see
    ``FitOptions.on_epoch_end``).
    """
    config = _run_config(config, resume_run_id)
    device = resolve_device(config["device"])
    seed_everything(config["seed"], device)

    prepared = prepare_dataset(config["dataset"], config["format"], config["class_map"], patch_sizes=())
    class_map = prepared.class_map
    granularity = config["granularity"]
    used = select_regions(prepared, config["max_regions"], config["seed"])
    check_masks(prepared, granularity, used)
    check_masks(prepared, "pw", used)
    split = split_regions(prepared, used, config["seed"])
    warn_absent_classes(prepared, granularity, split.train)
    logger.info("segmentation on %s: %d train, %d validation, %d test regions", prepared.name, len(split.train), len(split.val), len(split.test))

    model = build_segmenter(config["model"], config["encoder"], num_classes=class_map.num_classes + 1, pretrained=config["pretrained"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    criterion = build_loss(config["loss"])

    def dataset_of(indices: list[int], train: bool) -> RegionDataset:
        return RegionDataset(
            [prepared.regions[i].image for i in indices],
            [prepared.maps[i].class_maps[granularity] for i in indices],
            tile_size=config["tile_size"] if train else 0,
            augmentation=_augmentation(config["seed"]) if train else None,
        )

    options = loader_options(device, config["num_workers"], config["seed"])
    train_loader = DataLoader(dataset_of(split.train, True), batch_size=config["batch_size"], shuffle=True, collate_fn=collate_regions, **options)
    val_options = {key: value for key, value in options.items() if key != "generator"}
    val_loader = DataLoader(dataset_of(split.val, False), batch_size=config["batch_size"], shuffle=False, collate_fn=collate_regions, **val_options)

    tags = {
        keys.TAG_GRANULARITY: granularity,
        keys.TAG_MODEL: config["model"],
        keys.TAG_DATASET: prepared.name,
        keys.TAG_DATASET_DIGEST: prepared.digest,
        keys.TAG_SEED: config["seed"],
        "encoder": config["encoder"],
    }
    run_name = f"segment-{config['model']}-{granularity}-s{config['seed']}"
    with tracked_run(
        task=TASK,
        config=config,
        tags=tags,
        experiment=config["experiment"],
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
        run_name=run_name,
    ) as run, tempfile.TemporaryDirectory(prefix="granularity-segment-") as scratch:
        scratch = Path(scratch)
        if not run.resumed:
            run.log_dataset_input(
                region_table(prepared, split, granularity),
                name=prepared.name,
                digest=prepared.digest,
                source=str(Path(config["dataset"]).resolve()),
            )
        checkpoint_dir = CHECKPOINT_ROOT / run.run_id
        resume_from = local_checkpoints(run.run_id, checkpoint_dir) if run.resumed else None

        fit_options = FitOptions(
            epochs=config["epochs"],
            checkpoint_dir=checkpoint_dir,
            device=device,
            selection_metric="val_dice",
            higher_is_better=True,
            early_stopping=config["early_stopping"],
            checkpoint_extra={"class_names": class_map.names, "granularity": granularity},
            on_epoch_end=epoch_callback,
        )
        result = fit(
            model,
            optimizer,
            train_loader,
            val_loader,
            make_train_step(criterion),
            make_evaluate(criterion),
            fit_options,
            tracker=run,
            resume_from=resume_from,
        )
        run.log_metrics({"train_images_per_second_mean": result.images_per_second, "best_epoch": result.best_epoch})

        best = load_checkpoint(result.best_checkpoint, map_location=device)
        model.load_state_dict(best["model"])
        metrics, predictions = evaluate_test_regions(model, prepared, split.test, config, device)
        run.log_metrics(metrics)
        logger.info(
            "test against pw truth: pixel accuracy %.4f, dice %.4f, nuclei recall %.4f, cancer recall %.4f, detection F1 %.4f, PQ %.4f",
            metrics["test_pixel_accuracy"],
            metrics["test_dice"],
            metrics["test_nuclei_recall"],
            metrics["test_cancer_recall"],
            metrics["test_detection_f1"],
            metrics["test_pq"],
        )

        log_prediction_artifacts(run, prepared, predictions, scratch / "artifacts")
        log_segmenter(model, class_map, config, scratch)
        return run.run_id
