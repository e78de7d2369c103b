"""The classification task: train a patch classifier on one granularity and score it on the pixel-wise test patches.

:func:`run_classification` is the single entry point used by the CLI, the
MLproject entry point and the study runner. One call is one MLflow run:

1. check the tracking server, resolve the configuration (from the run itself
   when resuming), seed, prepare the dataset and select the windows;
2. build the model, loaders and optimizer;
3. train with :func:`granularity.training.loop.fit` inside
   :func:`granularity.tracking.run.tracked_run`, which logs ``train_loss``,
   ``val_loss``, ``val_f1`` and more with ``step=epoch``;
4. reload the best checkpoint (by validation macro F1), score it on the
   pixel-wise test windows (``test_*``) and on the run's own-granularity test
   windows (``own_test_*``), and log the prediction tables, confusion
   matrices and the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from granularity.data import augment
from granularity.data.prepared import PreparedDataset, prepare_dataset
from granularity.errors import UserError
from granularity.metrics.classification import ClassificationMetrics, with_prefix
from granularity.models.classifiers import build_classifier, classifier_spec
from granularity.tracking import keys
from granularity.tracking.run import TrackedRun, load_run_config, tracked_run
from granularity.tracking.uri import DEFAULT_EXPERIMENT, configure_mlflow
from granularity.training.checkpoint import CHECKPOINT_ROOT, load_checkpoint, local_checkpoints
from granularity.training.classification_artifacts import confusion_matrix_figure, predictions_table
from granularity.training.classification_config import resolve_classification_config
from granularity.training.classification_data import ClassificationWindows, select_windows
from granularity.training.device import default_num_workers, loader_options, resolve_device, seed_everything
from granularity.training.loop import FitOptions, autocast, device_batches, fit, prepare_model
from granularity.training.patch_dataset import PatchDataset

logger = logging.getLogger(__name__)

TASK = "classification"
SELECTION_METRIC = "val_f1"
STUDY_VARIANTS = 16

# Options a resumed run may change, because they do not change what it computes.
RESUME_OVERRIDABLE = ("device", "num_workers", "cache_dir")


def study_variant(patch: np.ndarray, variant: int) -> np.ndarray:
    """Return variant ``variant`` (0-15) of a patch: dihedral variant ``variant % 8``, colour-jittered from 8 on."""

    image = augment.dihedral(patch, variant % augment.NUM_DIHEDRAL)
    if variant >= augment.NUM_DIHEDRAL:
        # Drawn from NumPy's global generator, which the seed and the checkpoints cover.
        image = augment.colour_jitter(image, np.random.default_rng(np.random.randint(2**31)))
    return image


def classification_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Return the mean cross-entropy loss of one batch."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def make_evaluate(class_names: list[str]):
    """Return the validation function of the loop: loss, macro scores and per-class recall, prefixed ``val_``."""

    def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        metrics = None
        loss_sum = 0.0
        count = 0
        for images, labels in batches:
            logits = model(images).float()
            if metrics is None:
                metrics = ClassificationMetrics(class_names, device=logits.device)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += int(labels.numel())
            metrics.update(logits, labels)
        if metrics is None:
            raise UserError("the validation loader yielded no batches; the validation subset is empty")
        return {"val_loss": loss_sum / count, **with_prefix(metrics.compute(), "val_")}

    return evaluate


def predict_probabilities(model: nn.Module, loader: DataLoader, options: FitOptions) -> np.ndarray:
    """Return the softmax probabilities (N x K) of ``model`` over ``loader``, in loader order."""
    model.eval()
    outputs = []
    with torch.inference_mode(), autocast(options.device, options.use_mixed_precision):
        for images, _ in device_batches(loader, options.device, options.use_channels_last):
            outputs.append(torch.softmax(model(images).float(), dim=1).cpu())
    return torch.cat(outputs).numpy()


def _optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999))
    if name == "nadam":
        return torch.optim.NAdam(parameters, lr=lr, betas=(0.9, 0.999))
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True)


def _resolve_config(config: Mapping[str, Any], resume_run_id: str | None) -> dict[str, Any]:
    """Return the run's configuration: ``config`` for a new run, the logged one for a resumed run.

    A resumed run keeps every logged option except the execution options
    (device, loader workers, cache folder), which ``config`` may change.
    """
    if not resume_run_id:
        return resolve_classification_config(config)

    stored = load_run_config(resume_run_id, task=TASK)
    for key in RESUME_OVERRIDABLE:
        if config.get(key) is not None:
            stored[key] = config[key]
    return resolve_classification_config(stored)


def _loaders(
    prepared: PreparedDataset,
    windows: ClassificationWindows,
    config: dict[str, Any],
    device: torch.device,
    num_workers: int,
) -> dict[str, DataLoader]:
    spec = classifier_spec(config["model"])
    images = [region.image for region in prepared.regions]
    variants = STUDY_VARIANTS if config["augment"] == "study" else 1

    datasets = {
        "train": PatchDataset(images, windows.train, config["input_size"], spec.mean, spec.std, variants, study_variant),
        "val": PatchDataset(images, windows.val, config["input_size"], spec.mean, spec.std),
        "test": PatchDataset(images, windows.test, config["input_size"], spec.mean, spec.std),
        "own_test": PatchDataset(images, windows.own_test, config["input_size"], spec.mean, spec.std),
    }
    loaders = {}
    for name, dataset in datasets.items():
        options = loader_options(device, num_workers, config["seed"])
        if name in ("test", "own_test"):
            # Read once at the end; workers kept alive would only hold memory.
            options.pop("persistent_workers", None)
        loaders[name] = DataLoader(dataset, batch_size=config["batch_size"], shuffle=name == "train", drop_last=False, **options)
    return loaders


def _log_data(run: TrackedRun, prepared: PreparedDataset, windows: ClassificationWindows, config: dict[str, Any]) -> None:
    """Log the window tables as the run's dataset input, the class map and the window counts."""
    region_names = [region.name for region in prepared.regions]
    run.log_dataset_input(
        windows.combined(region_names),
        name=prepared.name,
        digest=prepared.digest,
        source=str(Path(config["dataset"]).resolve()),
        targets="label",
    )
    run.log_dict(prepared.class_map.to_dict(), "class_map.json")
    run.log_metrics({f"{name}_windows": count for name, count in windows.counts().items()}, step=0)


def _evaluate_test(
    run: TrackedRun,
    model: nn.Module,
    loaders: dict[str, DataLoader],
    windows: ClassificationWindows,
    prepared: PreparedDataset,
    options: FitOptions,
) -> dict[str, float]:
    """Score ``model`` on the pixel-wise and own-granularity test windows and log metrics, tables and figures."""
    import matplotlib.pyplot as plt

    region_names = [region.name for region in prepared.regions]
    results: dict[str, float] = {}
    for subset, table, prefix in (("test", windows.test, "test_"), ("own_test", windows.own_test, "own_test_")):
        if table.empty:
            logger.warning("no %s windows; %s metrics are not logged", subset, prefix.rstrip("_"))
            continue
        probabilities = predict_probabilities(model, loaders[subset], options)
        metrics = ClassificationMetrics(windows.class_names)
        metrics.update(torch.from_numpy(probabilities), torch.tensor(table["label"].to_numpy()))
        values = with_prefix(metrics.compute(), prefix)
        results.update(values)

        run.log_table(predictions_table(table, region_names, probabilities, windows.class_names), f"{subset}_predictions.csv")
        title = f"{'pixel-wise' if subset == 'test' else 'own-granularity'} test windows, {len(table)} patches"
        figure = confusion_matrix_figure(metrics.confusion_matrix(), windows.class_names, title)
        run.log_figure(figure, f"{subset}_confusion_matrix.png")
        plt.close(figure)

    run.log_metrics(results, step=0)
    return results


def _log_model(model: nn.Module, config: dict[str, Any], num_classes: int) -> None:
    import cloudpickle
    import mlflow
    import timm
    import torchvision
    from mlflow.models import infer_signature

    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    example = np.zeros((1, 3, config["input_size"], config["input_size"]), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, num_classes), dtype=np.float32))

    # Listing the requirements skips MLflow's inference, which loads the model again in a subprocess.
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
    ]
    # The pickle format keeps the batch size free; MLflow's default "pt2" export fixes it to the example's.
    mlflow.pytorch.log_model(model, name="model", signature=signature, pip_requirements=requirements, serialization_format="pickle")


def run_classification(
    config: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    epoch_callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> str:
    """Train and evaluate one classifier as one MLflow run; return the run id.

    ``config`` contains the ``classify`` options with underscores (see
    :mod:`granularity.training.classification_config`). With
    ``resume_run_id`` the run continues from its last checkpoint with its
    logged configuration; only device, loader workers and cache folder may
    change. ``epoch_callback(epoch, metrics)`` is called after every epoch
    (see ``FitOptions.on_epoch_end``). Raises UserError for invalid input,
    TrainingDivergedError for a non-finite loss; KeyboardInterrupt passes
    through after the run is marked KILLED.
    """
    # Fail on an unreachable tracking server before reading any data.
    configure_mlflow(str(config.get("experiment") or DEFAULT_EXPERIMENT))
    config = _resolve_config(config, resume_run_id)

    device = resolve_device(config["device"])
    seed_everything(config["seed"], device)
    num_workers = default_num_workers(device) if config["num_workers"] < 0 else config["num_workers"]

    prepared = prepare_dataset(
        config["dataset"],
        None if config["format"] == "auto" else config["format"],
        config["class_map"],
        patch_sizes=(config["patch_size"],),
        cache_root=config.get("cache_dir"),
    )
    windows = select_windows(prepared, config["granularity"], config["patch_size"], config["split"], config["seed"], config["max_patches_per_class"])
    loaders = _loaders(prepared, windows, config, device, num_workers)
    model = build_classifier(config["model"], len(windows.class_names), config["pretrained"])
    optimizer = _optimizer(config["optimizer"], model.parameters(), config["lr"])

    tags = {
        keys.TAG_GRANULARITY: config["granularity"],
        keys.TAG_MODEL: config["model"],
        keys.TAG_PATCH_SIZE: config["patch_size"],
        keys.TAG_DATASET: prepared.name,
        keys.TAG_DATASET_DIGEST: prepared.digest,
        keys.TAG_SEED: config["seed"],
    }
    run_name = f"{config['model']}-{config['granularity']}-{config['patch_size']}px-seed{config['seed']}"
    with tracked_run(
        task=TASK,
        config=config,
        tags=tags,
        experiment=config["experiment"],
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
        run_name=run_name,
    ) as run:
        checkpoint_dir = CHECKPOINT_ROOT / run.run_id
        resume_from = local_checkpoints(run.run_id, checkpoint_dir) if run.resumed else None
        if not run.resumed:
            _log_data(run, prepared, windows, config)

        options = FitOptions(
            epochs=config["epochs"],
            checkpoint_dir=checkpoint_dir,
            device=device,
            selection_metric=SELECTION_METRIC,
            early_stopping=config["early_stopping"],
            checkpoint_extra={"class_names": windows.class_names, "model": config["model"]},
            on_epoch_end=epoch_callback,
        )
        result = fit(
            model,
            optimizer,
            loaders["train"],
            loaders["val"],
            classification_step,
            make_evaluate(windows.class_names),
            options,
            tracker=run,
            resume_from=resume_from,
        )
        run.set_tags({"best_epoch": result.best_epoch, "stopped_early": str(result.stopped_early).lower()})

        best = load_checkpoint(result.best_checkpoint, map_location=device)
        model.load_state_dict(best["model"])
        prepare_model(model, options)
        test_metrics = _evaluate_test(run, model, loaders, windows, prepared, options)
        logger.info(
            "run %s: test_f1 %.4f, own_test_f1 %.4f (best epoch %d)",
            run.run_id,
            test_metrics.get("test_f1", float("nan")),
            test_metrics.get("own_test_f1", float("nan")),
            result.best_epoch,
        )
        _log_model(model, config, len(windows.class_names))
        return run.run_id
