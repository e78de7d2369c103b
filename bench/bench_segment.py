"""Benchmark the segmentation task against plain PyTorch.

1. Training throughput: images per second of the shared training loop
   (``training.loop.fit`` with the segmentation data, loss and validation)
   against a bare loop that runs forward, loss, backward and optimizer step
   over the same DataLoader, model and precision settings. Goal: >= 0.95.
2. Inference: sliding-window prediction (``models.tiling.predict_probabilities``)
   of consep-256 test regions against one plain forward pass over each
   padded region.

Usage:
    .venv/bin/python bench/bench_segment.py --device cpu --train-regions 32 --test-regions 32
    .venv/bin/python bench/bench_segment.py --device cuda --train-regions 432 --test-regions 224

Prints a Markdown table and writes bench/results/segment.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from granularity.data.class_map import ClassMap
from granularity.data.readers import read_regions
from granularity.models.segmenters import build_segmenter
from granularity.models.tiling import image_to_tensor, pad_to_multiple, predict_probabilities
from granularity.training.device import resolve_device, seed_everything
from granularity.training.loop import FitOptions, autocast, fit, move_to_device, prepare_model
from granularity.training.segmentation import RegionDataset, build_loss, collate_regions, make_evaluate, make_train_step

logger = logging.getLogger("bench_segment")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "consep-256"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(images, masks, batch_size: int, device: torch.device, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        RegionDataset(images, masks),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_regions,
        generator=generator,
        pin_memory=device.type == "cuda",
        num_workers=0,
    )


def bench_fit(images, masks, args, device) -> float:
    """Return training images per second of the shared loop (training epochs only, as the loop measures them)."""
    seed_everything(0, device)
    model = build_segmenter(args.model, args.encoder, num_classes=5, pretrained="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = build_loss("ce")
    train = _loader(images, masks, args.batch_size, device, 0)
    val = _loader(images[: args.batch_size], masks[: args.batch_size], args.batch_size, device, 1)
    with tempfile.TemporaryDirectory() as folder:
        options = FitOptions(epochs=args.epochs, checkpoint_dir=Path(folder), device=device, selection_metric="val_dice", progress=False)
        result = fit(model, optimizer, train, val, make_train_step(criterion), make_evaluate(criterion), options)
    # The first epoch includes cuDNN autotuning and allocator warm-up; the bare loop skips it too.
    per_epoch = [entry["train_images_per_second"] for entry in result.history]
    return float(np.mean(per_epoch[1:] if len(per_epoch) > 1 else per_epoch))


def bench_bare(images, masks, args, device) -> float:
    """Return training images per second of a bare loop with the loop's precision and memory format."""
    seed_everything(0, device)
    model = build_segmenter(args.model, args.encoder, num_classes=5, pretrained="none")
    options = FitOptions(epochs=args.epochs, checkpoint_dir=Path("."), device=device)
    prepare_model(model, options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = build_loss("ce")
    loader = _loader(images, masks, args.batch_size, device, 0)

    rates = []
    model.train()
    for _ in range(args.epochs):
        _synchronize(device)
        started = time.perf_counter()
        count = 0
        for batch in loader:
            batch_images, batch_masks = move_to_device(batch, device, options.use_channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, options.use_mixed_precision):
                loss = criterion(model(batch_images), batch_masks)
            loss.backward()
            optimizer.step()
            count += batch_images.shape[0]
        _synchronize(device)
        rates.append(count / (time.perf_counter() - started))
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


@torch.no_grad()
def bench_inference(regions, args, device) -> dict[str, float]:
    """Return seconds for plain padded forwards and for sliding windows of two tile sizes over ``regions``."""
    model = build_segmenter(args.model, args.encoder, num_classes=5, pretrained="none").to(device).eval()
    amp = device.type == "cuda"

    def plain(subset) -> None:
        for region in subset:
            padded, size = pad_to_multiple(region.image)
            batch = image_to_tensor(padded).unsqueeze(0).to(device)
            with torch.autocast(device_type=device.type, enabled=amp):
                logits = model(batch)
            torch.softmax(logits.float(), dim=1)[..., : size[0], : size[1]].argmax(dim=1).cpu()

    def sliding(subset, tile: int, overlap: int) -> None:
        for region in subset:
            predict_probabilities(model, region.image, tile_size=tile, overlap=overlap, batch_size=8, device=device, amp=amp).argmax(dim=0)

    runs = {
        "plain": plain,
        "sliding_256": lambda subset: sliding(subset, 256, 64),
        "sliding_128": lambda subset: sliding(subset, 128, 32),
    }
    # Warm-up on two regions, so cuDNN autotuning for each input size is not timed.
    for run in runs.values():
        run(regions[:2])
    seconds = {}
    for name, run in runs.items():
        _synchronize(device)
        started = time.perf_counter()
        run(regions)
        _synchronize(device)
        seconds[name] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training measurement; the first is warm-up")
    parser.add_argument("--train-regions", type=int, default=32)
    parser.add_argument("--test-regions", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "segment.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = resolve_device(args.device)
    class_map = ClassMap.load(ROOT / "mlproject" / "class_maps" / "consep.yaml")
    train_regions = read_regions(args.dataset / "Train", "consep", class_map)[: args.train_regions]
    test_regions = read_regions(args.dataset / "Test", "consep", class_map)[: args.test_regions]
    images = [region.image for region in train_regions]
    masks = [region.class_map_image() for region in train_regions]

    bare = bench_bare(images, masks, args, device)
    ours = bench_fit(images, masks, args, device)
    seconds = bench_inference(test_regions, args, device)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": f"{args.model}/{args.encoder}",
        "batch_size": args.batch_size,
        "train_regions": len(images),
        "test_regions": len(test_regions),
        "train_images_per_second_loop": ours,
        "train_images_per_second_bare": bare,
        "train_ratio": ours / bare,
        "inference_seconds": seconds,
        "sliding_256_over_plain": seconds["sliding_256"] / seconds["plain"],
        "sliding_128_over_plain": seconds["sliding_128"] / seconds["plain"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"| measure | value |\n|---|---|")
    print(f"| device | {result['device']} |")
    print(f"| training images/s, shared loop | {ours:.2f} |")
    print(f"| training images/s, bare loop | {bare:.2f} |")
    print(f"| training ratio loop / bare | {result['train_ratio']:.3f} |")
    print(f"| inference s, plain padded forward, {len(test_regions)} regions | {seconds['plain']:.2f} |")
    print(f"| inference s, sliding window 256 (overlap 64) | {seconds['sliding_256']:.2f} |")
    print(f"| inference s, sliding window 128 (overlap 32) | {seconds['sliding_128']:.2f} |")
    print(f"| sliding 256 / plain | {result['sliding_256_over_plain']:.3f} |")
    print(f"| sliding 128 / plain | {result['sliding_128_over_plain']:.3f} |")


if __name__ == "__main__":
    main()
