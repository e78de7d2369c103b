"""The training loop shared by every task: epochs, validation, model selection, checkpoints and resume.

A task plugs in two functions and keeps everything task-specific to itself:

- ``train_step(model, batch) -> loss``: the forward pass and loss of one
  batch that the loop has already moved to the device. The loop runs it
  under autocast and does the backward pass and the optimizer step.
- ``evaluate(model, batches) -> dict``: the validation metrics, given an
  iterable of batches already on the device. The loop runs it in eval mode
  under ``torch.inference_mode`` and autocast. The dict must hold
  ``val_loss`` and the selection metric (``val_f1`` for classification,
  ``val_dice`` for segmentation).

Per epoch the loop logs ``train_loss`` and every metric of ``evaluate`` with
``step=epoch`` (1-based) through the optional ``tracker``, writes the
checkpoint ``last.pt`` (and ``best.pt`` when the selection metric improved),
logs both as artifacts under ``checkpoints/``, and logs one summary line.
A non-finite training loss raises :class:`TrainingDivergedError`. With
``resume_from`` the loop restores the model, optimizer, model-selection
state and random states and continues with the next epoch.

On CUDA the loop uses mixed precision (bfloat16 where supported, else
float16 with a gradient scaler), channels-last memory format and
non-blocking copies; the caller's loaders should pin memory.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from granularity.errors import UserError
from granularity.training.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_ARTIFACT_DIR,
    LAST_CHECKPOINT,
    capture_random_states,
    load_checkpoint,
    restore_random_states,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

TrainStep = Callable[[nn.Module, Any], torch.Tensor]
Evaluate = Callable[[nn.Module, Iterable[Any]], Mapping[str, float]]

# Reading the loss back from the GPU waits for the queued kernels, so it is read once every this many batches.
LOSS_SYNC_INTERVAL = 20


class TrainingDivergedError(UserError):
    """The training loss became NaN or infinite."""


class MetricTracker(Protocol):
    """What the loop needs from a run: :class:`granularity.tracking.run.TrackedRun` provides it."""

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> Any: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...


@dataclass
class FitOptions:
    """Settings of one :func:`fit` call.

    Attributes:
        epochs: total epochs, counting those done before a resume.
        checkpoint_dir: folder for ``last.pt`` and ``best.pt``.
        device: where the model trains.
        selection_metric: the metric of ``evaluate`` that picks the best epoch.
        higher_is_better: direction of ``selection_metric``.
        early_stopping: stop after this many epochs without improvement; 0 turns it off.
        mixed_precision: autocast on; None means on for CUDA only.
        channels_last: channels-last model and inputs; None means on for CUDA only.
        progress: show tqdm bars for epochs and batches.
        checkpoint_extra: stored under ``extra`` in every checkpoint.
        on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` after each epoch's metrics
            are logged and its checkpoints written. An exception it raises, such as a
            sweep's ``optuna.TrialPruned``, stops training and passes through :func:`fit`.
    """

    epochs: int
    checkpoint_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    selection_metric: str = "val_f1"
    higher_is_better: bool = True
    early_stopping: int = 0
    mixed_precision: bool | None = None
    channels_last: bool | None = None
    progress: bool = True
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    on_epoch_end: Callable[[int, Mapping[str, float]], None] | None = None

    @property
    def use_mixed_precision(self) -> bool:
        return self.device.type == "cuda" if self.mixed_precision is None else self.mixed_precision

    @property
    def use_channels_last(self) -> bool:
        return self.device.type == "cuda" if self.channels_last is None else self.channels_last


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        last_epoch: the last completed epoch.
        best_epoch: the epoch whose model ``best_checkpoint`` contains.
        best_metric: its value of the selection metric.
        stopped_early: True when early stopping ended training.
        history: one dict of logged metrics per epoch run in this call.
        last_checkpoint, best_checkpoint: the checkpoint files on disk.
        images_per_second: training throughput over the epochs of this call.
    """

    last_epoch: int
    best_epoch: int
    best_metric: float
    stopped_early: bool
    history: list[dict[str, float]]
    last_checkpoint: Path
    best_checkpoint: Path
    images_per_second: float


def move_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor in ``batch`` (nested tuples, lists, dicts) to ``device`` without blocking.

    With ``channels_last``, 4-D floating-point tensors (image batches) switch
    to channels-last memory format; masks and labels keep their layout.
    """
    if isinstance(batch, torch.Tensor):
        tensor = batch.to(device, non_blocking=True)
        if channels_last and tensor.dim() == 4 and tensor.is_floating_point():
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device, channels_last) for value in batch)
    return batch


def device_batches(loader: Iterable[Any], device: torch.device, channels_last: bool = False) -> Iterator[Any]:
    """Yield the batches of ``loader`` moved to ``device``."""
    for batch in loader:
        yield move_to_device(batch, device, channels_last)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Return the mixed-precision type for ``device``: bfloat16 where supported, else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """Return an autocast context for ``device``, or a no-op context when ``enabled`` is False."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device))


def prepare_model(model: nn.Module, options: FitOptions) -> nn.Module:
    """Move ``model`` to the device and memory format of ``options``, in place."""
    model.to(options.device)
    if options.use_channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])


def _improved(value: float, best: float | None, higher_is_better: bool) -> bool:
    # The first epoch always becomes the best, so a best checkpoint exists even when validation yields NaN.
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if higher_is_better else value < best


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


@dataclass
class _SelectionState:
    epoch: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Any],
    train_step: TrainStep,
    options: FitOptions,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
) -> tuple[float, int]:
    """Train one epoch; return the mean loss per image and the image count."""
    model.train()
    device = options.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    images = 0

    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc=f"epoch {epoch} train", unit="batch", leave=False, disable=not options.progress)
    for index, batch in enumerate(bar, start=1):
        batch = move_to_device(batch, device, options.use_channels_last)
        size = _batch_size(batch)
        optimizer.zero_grad(set_to_none=True)

        with autocast(device, options.use_mixed_precision):
            loss = train_step(model, batch)

        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        loss_sum += loss.detach().double() * size
        images += size

        if index % LOSS_SYNC_INTERVAL == 0 or index == total:
            mean_loss = loss_sum.item() / images
            if not math.isfinite(mean_loss):
                learning_rate = optimizer.param_groups[0]["lr"]
                raise TrainingDivergedError(
                    f"training loss became {mean_loss} in epoch {epoch} by batch {index}; "
                    f"lower the learning rate (now {learning_rate:g}) or check the input data"
                )
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)

    if images == 0:
        raise UserError("the training loader yielded no batches; check the split fractions and the dataset size")
    mean_loss = loss_sum.item() / images
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(f"training loss became {mean_loss} in epoch {epoch}; lower the learning rate or check the input data")
    return mean_loss, images


def _validate(model: nn.Module, loader: Iterable[Any], evaluate: Evaluate, options: FitOptions, epoch: int) -> dict[str, float]:
    model.eval()
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc=f"epoch {epoch} validate", unit="batch", leave=False, disable=not options.progress)
    with torch.inference_mode(), autocast(options.device, options.use_mixed_precision):
        metrics = dict(evaluate(model, device_batches(bar, options.device, options.use_channels_last)))

    missing = [key for key in ("val_loss", options.selection_metric) if key not in metrics]
    if missing:
        raise KeyError(f"evaluate() returned {sorted(metrics)} without {missing}")
    return {key: float(value) for key, value in metrics.items()}


def _log_checkpoint(tracker: MetricTracker | None, path: Path) -> None:
    if tracker is not None:
        tracker.log_artifact(path, CHECKPOINT_ARTIFACT_DIR)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    train_step: TrainStep,
    evaluate: Evaluate,
    options: FitOptions,
    tracker: MetricTracker | None = None,
    resume_from: str | Path | None = None,
) -> FitResult:
    """Train ``model`` for ``options.epochs`` epochs, validating, checkpointing and logging each epoch.

    ``optimizer`` must hold ``model``'s parameters; moving the model to the
    device keeps them, so it may be built before or after this call starts.
    Returns when the epochs are done or early stopping ends training.
    Raises TrainingDivergedError on a non-finite loss; KeyboardInterrupt
    passes through and leaves the last completed epoch's checkpoint on disk.
    """
    prepare_model(model, options)
    checkpoint_dir = Path(options.checkpoint_dir)
    last_path = checkpoint_dir / LAST_CHECKPOINT
    best_path = checkpoint_dir / BEST_CHECKPOINT
    loader_generator = getattr(train_loader, "generator", None)

    # bfloat16 keeps float32's range, so only float16 needs loss scaling.
    scaler = None
    if options.use_mixed_precision and options.device.type == "cuda" and autocast_dtype(options.device) == torch.float16:
        scaler = torch.amp.GradScaler("cuda")

    state = _SelectionState()
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from, map_location=options.device)
        if "optimizer" not in checkpoint or "random_states" not in checkpoint:
            raise UserError(f"{resume_from} contains model weights only; resume from {LAST_CHECKPOINT}, not {BEST_CHECKPOINT}")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        state = _SelectionState(
            epoch=int(checkpoint["epoch"]),
            best_metric=checkpoint.get("best_metric"),
            best_epoch=int(checkpoint.get("best_epoch", 0)),
            epochs_without_improvement=int(checkpoint.get("epochs_without_improvement", 0)),
        )
        restore_random_states(checkpoint["random_states"], loader_generator)
        logger.info("resumed from %s after epoch %d of %d", resume_from, state.epoch, options.epochs)

        # Only a tracker that skips steps it has logged (TrackedRun) can take the epoch again without a duplicate.
        if tracker is not None and hasattr(tracker, "last_logged_step") and checkpoint.get("metrics"):
            tracker.log_metrics(checkpoint["metrics"], step=state.epoch)

    history: list[dict[str, float]] = []
    stopped_early = False
    train_seconds = 0.0
    train_images = 0

    with logging_redirect_tqdm():
        epochs_bar = tqdm(
            range(state.epoch + 1, options.epochs + 1),
            initial=state.epoch,
            total=options.epochs,
            desc="epochs",
            unit="epoch",
            disable=not options.progress,
        )
        for epoch in epochs_bar:
            started = time.perf_counter()
            train_loss, images = _train_one_epoch(model, optimizer, train_loader, train_step, options, scaler, epoch)
            train_time = time.perf_counter() - started
            train_seconds += train_time
            train_images += images

            val_metrics = _validate(model, val_loader, evaluate, options, epoch)
            metrics = {"train_loss": train_loss, **val_metrics, "train_images_per_second": images / max(train_time, 1e-9)}
            history.append(metrics)

            value = val_metrics[options.selection_metric]
            improved = _improved(value, state.best_metric, options.higher_is_better)
            state.epoch = epoch
            if improved:
                state.best_metric, state.best_epoch, state.epochs_without_improvement = value, epoch, 0
            else:
                state.epochs_without_improvement += 1

            # The checkpoints are written before anything goes to the tracking server, so a server that
            # stops responding costs no training. The last checkpoint carries the epoch's metrics,
            # which a resume logs again in case the server missed them.
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "best_metric": state.best_metric,
                "best_epoch": state.best_epoch,
                "epochs_without_improvement": state.epochs_without_improvement,
                "selection_metric": options.selection_metric,
                "random_states": capture_random_states(loader_generator),
                "extra": options.checkpoint_extra,
                "metrics": metrics,
            }
            if improved:
                save_checkpoint(best_path, {"model": checkpoint["model"], "epoch": epoch, "best_metric": value, "extra": options.checkpoint_extra})
            save_checkpoint(last_path, checkpoint)

            if tracker is not None:
                tracker.log_metrics(metrics, step=epoch)
            if improved:
                _log_checkpoint(tracker, best_path)
            _log_checkpoint(tracker, last_path)

            best_text = f"best {options.selection_metric} {state.best_metric:.4f} at epoch {state.best_epoch}"
            logger.info(
                "epoch %d/%d: %s (%s), %.1f s, %.3g images/s",
                epoch,
                options.epochs,
                _format_metrics({key: metrics[key] for key in ("train_loss", "val_loss", options.selection_metric)}),
                best_text,
                time.perf_counter() - started,
                metrics["train_images_per_second"],
            )
            epochs_bar.set_postfix({options.selection_metric: f"{value:.4f}"}, refresh=False)

            if options.on_epoch_end is not None:
                options.on_epoch_end(epoch, dict(metrics))

            if options.early_stopping > 0 and state.epochs_without_improvement >= options.early_stopping:
                logger.info("early stopping: %s did not improve for %d epochs", options.selection_metric, options.early_stopping)
                stopped_early = True
                break
        epochs_bar.close()

    if not best_path.is_file():
        raise UserError(f"no best checkpoint in {checkpoint_dir}; the run has not completed an epoch")

    return FitResult(
        last_epoch=state.epoch,
        best_epoch=state.best_epoch,
        best_metric=float("nan") if state.best_metric is None else float(state.best_metric),
        stopped_early=stopped_early,
        history=history,
        last_checkpoint=last_path,
        best_checkpoint=best_path,
        images_per_second=train_images / train_seconds if train_seconds > 0 else float("nan"),
    )
