"""Benchmark the classification training loop against a bare PyTorch loop.

Both loops train the same classifier on the same DataLoader of patches
(``PatchDataset`` windows cut from region images and resized, as ``classify``
feeds them) with the same batch size and precision settings. The bare loop
runs forward, loss, backward and optimizer step only. The shared loop is
``training.loop.fit`` with the classification step and validation, progress
bars, a checkpoint per epoch and an MLflow run in a temporary SQLite store
logging metrics and checkpoints, so its number includes that overhead.

The two loops alternate for ``--repeats`` rounds, each starting from the same
initial weights, and the medians are compared, so load from other processes
affects both alike. Throughput counts training images over the whole call
(training, validation, checkpoints and logging for the shared loop), after
one warm-up epoch per call. Goal: shared / bare >= 0.95.

Usage:
    .venv/bin/python bench/bench_classify.py --device cpu
    .venv/bin/python bench/bench_classify.py --device cuda --windows 8192 --input-size 128 --batch-size 128

Prints a Markdown table and writes bench/results/classify-<device type>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from granularity.models.classifiers import build_classifier, classifier_spec
from granularity.training.classification import classification_step, make_evaluate
from granularity.training.device import loader_options, resolve_device, seed_everything
from granularity.training.loop import FitOptions, autocast, fit, move_to_device, prepare_model
from granularity.training.patch_dataset import PatchDataset

logger = logging.getLogger("bench_classify")

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["class 0", "class 1", "class 2"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _windows(count: int, patch_size: int, seed: int) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Return random 256 x 256 region images and ``count`` labelled windows on them."""
    generator = np.random.default_rng(seed)
    images = [generator.integers(0, 256, size=(256, 256, 3), dtype=np.uint8) for _ in range(16)]
    table = pd.DataFrame(
        {
            "region": generator.integers(0, len(images), size=count),
            "x": generator.integers(0, 256 - patch_size + 1, size=count),
            "y": generator.integers(0, 256 - patch_size + 1, size=count),
            "size": patch_size,
            "label": generator.integers(0, len(CLASS_NAMES), size=count),
        }
    )
    return images, table


def _bare_loop(model, optimizer, loader, options: FitOptions, epochs: int) -> float:
    """Train ``epochs`` epochs with a plain loop; return images per second after the first epoch."""
    prepare_model(model, options)
    model.train()
    images = 0
    started = 0.0
    for epoch in range(epochs):
        if epoch == 1:
            _synchronize(options.device)
            started = time.perf_counter()
        for batch in loader:
            batch = move_to_device(batch, options.device, options.use_channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast(options.device, options.use_mixed_precision):
                loss = F.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            optimizer.step()
            if epoch >= 1:
                images += len(batch[1])
    _synchronize(options.device)
    return images / (time.perf_counter() - started)


def _shared_loop(model, optimizer, loader, val_loader, options: FitOptions, epochs: int, folder: Path) -> float:
    """Train with ``fit`` inside an MLflow run; return images per second after the first epoch."""
    from granularity.tracking.run import tracked_run

    timestamps: list[float] = []

    class TimedTracker:
        """Wraps the run so each epoch's end time is recorded once its metrics are logged."""

        def __init__(self, run):
            self.run = run

        def log_metrics(self, metrics, step=0):
            self.run.log_metrics(metrics, step=step)

        def log_artifact(self, local_path, artifact_path=None):
            self.run.log_artifact(local_path, artifact_path)
            if Path(local_path).name == "last.pt":
                _synchronize(options.device)
                timestamps.append(time.perf_counter())

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    with tracked_run(task="benchmark", config={"bench": "classify"}, experiment="bench-classify") as run:
        fit(model, optimizer, loader, val_loader, classification_step, make_evaluate(CLASS_NAMES), options, tracker=TimedTracker(run))

    images = len(loader.dataset) * (epochs - 1)
    return images / (timestamps[-1] - timestamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--windows", type=int, default=512, help="training windows per epoch")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per call; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of bare and shared loop")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = resolve_device(args.device)
    seed_everything(0, device)
    spec = classifier_spec(args.model)
    images, table = _windows(args.windows, args.patch_size, seed=0)
    dataset = PatchDataset(images, table, args.input_size, spec.mean, spec.std)
    val_dataset = PatchDataset(images, table.iloc[: args.batch_size], args.input_size, spec.mean, spec.std)
    initial = build_classifier(args.model, len(CLASS_NAMES), "none")

    bare, shared = [], []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, **loader_options(device, args.num_workers, repeat))
            val_loader = DataLoader(val_dataset, batch_size=args.batch_size, **loader_options(device, args.num_workers, repeat))
            options = FitOptions(epochs=args.epochs, checkpoint_dir=Path(folder) / f"checkpoints-{repeat}", device=device, progress=True)

            model = copy.deepcopy(initial)
            bare.append(_bare_loop(model, torch.optim.Adam(model.parameters(), 1e-3), loader, options, args.epochs))
            model = copy.deepcopy(initial)
            shared.append(_shared_loop(model, torch.optim.Adam(model.parameters(), 1e-3), loader, val_loader, options, args.epochs, Path(folder)))

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "arguments": vars(args),
        "bare_images_per_second": bare,
        "shared_images_per_second": shared,
        "ratio": statistics.median(shared) / statistics.median(bare),
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / f"classify-{device.type}.json").write_text(json.dumps(result, indent=2))

    print("| measure | value |")
    print("|---|---|")
    print(f"| training images/s, bare loop (median of {args.repeats}) | {statistics.median(bare):.1f} |")
    print(f"| training images/s, shared loop with tracking (median of {args.repeats}) | {statistics.median(shared):.1f} |")
    print(f"| ratio shared / bare (goal >= 0.95) | {result['ratio']:.3f} |")


if __name__ == "__main__":
    main()
