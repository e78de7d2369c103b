"""``granularity classify``: train and evaluate one patch classifier on one granularity, tracked in MLflow."""

from __future__ import annotations

import argparse

from granularity.data.granularity import GRANULARITIES
from granularity.data.readers import FORMATS
from granularity.models.classifiers import CLASSIFIERS
from granularity.training.classification_config import (
    AUGMENTATIONS,
    CLASSIFICATION_DEFAULTS,
    OPTIMIZERS,
    SPLITS,
)

DEFAULTS = CLASSIFICATION_DEFAULTS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="train a patch classifier on one granularity and test it on the pixel-wise patches",
        description="Train a patch classifier on windows labelled from one annotation granularity (pw, el, bd), "
        "select the best epoch by validation macro F1, score it on the pixel-wise test windows (test_*) and on the "
        "run's own granularity (own_test_*), and log everything to one MLflow run. Checkpoints are written to "
        "checkpoints/<run id>/ in the working directory and logged as artifacts.",
    )
    parser.add_argument("--dataset", help="dataset folder, e.g. ../shared/datasets/consep-256 (required unless --resume)")
    parser.add_argument("--format", default=DEFAULTS["format"], choices=("auto",) + FORMATS, help="dataset reader (default: %(default)s)")
    parser.add_argument("--class-map", help="class map YAML, e.g. mlproject/class_maps/consep.yaml (required unless --resume)")
    parser.add_argument("--granularity", default=DEFAULTS["granularity"], choices=GRANULARITIES, help="annotations to train on (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=DEFAULTS["patch_size"], help="window side in pixels; the stride is half of it (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULTS["model"], choices=tuple(CLASSIFIERS), help="classifier; mobilenet is MobileNet v1 (default: %(default)s)")
    parser.add_argument(
        "--pretrained",
        default=DEFAULTS["pretrained"],
        help="imagenet (from the local torch hub or Hugging Face cache), none, or a weight file path (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="patches per batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="initial learning rate (default: %(default)s)")
    parser.add_argument("--optimizer", default=DEFAULTS["optimizer"], choices=OPTIMIZERS, help="adam and nadam use betas (0.9, 0.999), sgd Nesterov momentum 0.9 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the split, balancing, initialisation and shuffling (default: %(default)s)")
    parser.add_argument("--split", default=DEFAULTS["split"], choices=SPLITS, help="draw the 80/10/10 split over region groups or over windows (default: %(default)s)")
    parser.add_argument("--max-patches-per-class", type=int, default=DEFAULTS["max_patches_per_class"], help="cap on training and validation windows per class; 0 = no cap (default: %(default)s)")
    parser.add_argument("--augment", default=DEFAULTS["augment"], choices=AUGMENTATIONS, help="study: 16 patches per training window (8 dihedral variants, each also colour-jittered) (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=DEFAULTS["input_size"], help="side in pixels the patches are resized to (default: %(default)s)")
    parser.add_argument("--early-stopping", type=int, default=DEFAULTS["early_stopping"], help="stop after this many epochs without a better validation F1; 0 = off (default: %(default)s)")
    parser.add_argument("--device", default=DEFAULTS["device"], help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=DEFAULTS["num_workers"], help="data-loader worker processes; -1 = none on the CPU, up to 8 on CUDA (default: %(default)s)")
    parser.add_argument("--experiment", default=DEFAULTS["experiment"], help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="prepared-dataset cache folder (default: $GRANULARITY_CACHE or .cache/granularity)")
    parser.add_argument("--parent-run-id", default=None, help="nest the run under this MLflow run (used by study)")
    parser.add_argument("--resume", default=None, metavar="RUN_ID", help="continue this run from its last checkpoint with its logged options; only --device, --num-workers and --cache-dir may change")
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> dict:
    """Return the run configuration from parsed options, with the option names' dashes as underscores."""
    config = {key: getattr(args, key) for key in CLASSIFICATION_DEFAULTS}
    config["cache_dir"] = args.cache_dir
    return config


def run(args: argparse.Namespace) -> int:
    from granularity.training.classification import run_classification
    from granularity.tracking.uri import resolve_tracking_uri

    run_id = run_classification(config_from_args(args), parent_run_id=args.parent_run_id, resume_run_id=args.resume)
    print(f"classification run {run_id} finished; see it with `mlflow ui --backend-store-uri {resolve_tracking_uri()}`")
    return 0
