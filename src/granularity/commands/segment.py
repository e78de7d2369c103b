"""``granularity segment``: train a segmenter on one granularity's masks and test it against the pixel-wise truth."""

from __future__ import annotations

import argparse

from granularity.data.granularity import GRANULARITIES
from granularity.data.readers import FORMATS
from granularity.errors import ConfigError
from granularity.models.segmenters import ARCHITECTURES
from granularity.tracking.uri import DEFAULT_EXPERIMENT
from granularity.training.device import DEVICES
from granularity.training.segmentation import DEFAULTS, LOSSES, SPLITS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="train UNet, FPN or LinkNet on one granularity's class masks",
        description="Train a semantic segmenter (background plus every class of the class map) on the masks of one "
        "annotation granularity, test it against the pixel-wise truth and log everything to MLflow.",
    )
    parser.add_argument("--dataset", help="dataset folder, e.g. ../shared/datasets/consep-256 (required unless --resume)")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="reader; auto detects it when unambiguous")
    parser.add_argument("--class-map", help="class map YAML, e.g. mlproject/class_maps/consep.yaml (required unless --resume)")
    parser.add_argument("--granularity", default=DEFAULTS["granularity"], choices=GRANULARITIES, help="training masks: pixel-wise, ellipse or box (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULTS["model"], choices=tuple(ARCHITECTURES), help="architecture (default: %(default)s)")
    parser.add_argument("--encoder", default=DEFAULTS["encoder"], help="segmentation-models-pytorch encoder, or tu-<timm model> (default: %(default)s)")
    parser.add_argument("--pretrained", default=DEFAULTS["pretrained"], help="encoder weights: imagenet (local cache only), none, or a weight file (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="regions or tiles per batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed for the split, the region subset and training (default: %(default)s)")
    parser.add_argument("--split", default=DEFAULTS["split"], choices=SPLITS, help="80/10/10 split by region group (default: %(default)s)")
    parser.add_argument("--tile-size", type=int, default=DEFAULTS["tile_size"], help="training crop in pixels, a multiple of 32; 0 = whole regions (default: %(default)s)")
    parser.add_argument("--loss", default=DEFAULTS["loss"], choices=LOSSES, help="cross-entropy, or cross-entropy plus Dice loss (default: %(default)s)")
    parser.add_argument("--max-regions", type=int, default=DEFAULTS["max_regions"], help="use a seeded random subset of this many regions; 0 = all (default: %(default)s)")
    parser.add_argument("--early-stopping", type=int, default=DEFAULTS["early_stopping"], help="stop after this many epochs without a better val_dice; 0 = off (default: %(default)s)")
    parser.add_argument("--device", default=DEFAULTS["device"], help=f"one of {', '.join(DEVICES)} or cuda:N (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=DEFAULTS["num_workers"], help="data-loader worker processes (default: %(default)s)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--resume", default=None, metavar="RUN_ID", help="continue an interrupted or failed segment run from its last checkpoint")
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> dict:
    """Return the run configuration of the parsed options."""
    config = {key: getattr(args, key) for key in DEFAULTS}
    config["format"] = None if args.format == "auto" else args.format
    return config


def run(args: argparse.Namespace) -> int:
    from granularity.training.segmentation import run_segmentation

    config = config_from_args(args)
    if not args.resume:
        missing = [option for option, value in (("--dataset", args.dataset), ("--class-map", args.class_map)) if not value]
        if missing:
            raise ConfigError(f"missing {' and '.join(missing)}; pass them, or --resume RUN_ID to continue a run")
    if args.resume:
        # The resumed run keeps its own configuration; only where and how fast it runs may change.
        config = {"device": args.device, "num_workers": args.num_workers}
    run_id = run_segmentation(config, resume_run_id=args.resume)
    print(f"segment run {run_id} finished; its model is runs:/{run_id}/model")
    return 0
