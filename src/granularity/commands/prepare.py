"""``granularity prepare``: read a dataset, derive granularities, label windows, log one MLflow run."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from granularity.data.granularity import GRANULARITIES
from granularity.data.prepared import DEFAULT_PATCH_SIZES, PreparedDataset, prepare_dataset
from granularity.data.readers import FORMATS
from granularity.errors import ConfigError
from granularity.tracking import keys
from granularity.tracking.params import log_params_once
from granularity.tracking.provenance import git_commit
from granularity.tracking.uri import DEFAULT_EXPERIMENT, configure_mlflow

logger = logging.getLogger(__name__)


def parse_patch_sizes(text: str) -> tuple[int, ...]:
    """Parse ``32,64,128`` into sizes; an empty string gives no sizes."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--patch-sizes {text!r} is invalid; use comma-separated pixel sizes such as 32,64,128") from None
    if any(size <= 0 for size in sizes):
        raise ConfigError(f"--patch-sizes {text!r} is invalid; every size must be a positive number of pixels")
    return sizes


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="read a dataset, derive ellipse and box annotations, cut and label patches",
        description="Read a nuclei dataset, derive ellipse (el) and bounding-box (bd) annotations from the "
        "pixel-wise outlines (pw), label sliding windows, cache the result and log an MLflow run.",
    )
    parser.add_argument("--dataset", required=True, help="dataset folder, e.g. ../shared/datasets/consep-256")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="reader; auto detects it when unambiguous")
    parser.add_argument("--class-map", required=True, help="class map YAML, e.g. mlproject/class_maps/consep.yaml")
    parser.add_argument("--patch-sizes", default=",".join(map(str, DEFAULT_PATCH_SIZES)), help="window sizes in pixels (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=0, help="window stride in pixels; 0 = half the window (default)")
    parser.add_argument("--export", default=None, metavar="DIR", help="also write class masks and window tables under DIR")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="prepared-dataset cache folder (default: $GRANULARITY_CACHE or .cache/granularity)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything and write no cache")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    patch_sizes = parse_patch_sizes(args.patch_sizes)
    stride = args.stride or None
    if args.stride < 0:
        raise ConfigError(f"--stride {args.stride} is invalid; use a positive number of pixels, or 0 for half the window")

    # Fail on an unreachable tracking server before any work is done.
    tracking_uri = configure_mlflow(args.experiment)

    prepared = prepare_dataset(
        args.dataset,
        None if args.format == "auto" else args.format,
        args.class_map,
        patch_sizes=patch_sizes,
        stride=stride,
        cache_root=args.cache_dir,
        use_cache=not args.no_cache,
    )
    if args.export:
        export_dataset(prepared, Path(args.export))
    run_id = log_prepare_run(prepared, args, patch_sizes)

    nuclei = prepared.nucleus_counts()
    print(f"prepared {prepared.name}: {len(prepared.regions)} regions, {sum(nuclei.values())} nuclei "
          f"({', '.join(f'{name} {count}' for name, count in nuclei.items())}), "
          f"{prepared.ellipse_fallbacks} ellipse fallbacks, {_cache_state(prepared)}")
    for (size, granularity), counts in sorted(prepared.window_counts().items()):
        print(f"  windows {size:>4} px {granularity}: {sum(counts.values()):>6}  " + "  ".join(f"{n}={c}" for n, c in counts.items()))
    if args.export:
        print(f"exported class masks and window tables to {args.export}")
    print(f"MLflow run {run_id} in experiment {args.experiment!r} at {tracking_uri}")
    return 0


def _cache_state(prepared: PreparedDataset) -> str:
    if prepared.cache_dir is None:
        return "no cache"
    return f"cache {'hit' if prepared.cache_hit else 'written'} in {prepared.cache_dir}"


def export_dataset(prepared: PreparedDataset, folder: Path) -> None:
    """Write ``<granularity>/<region>.png`` class masks and ``patches_<size>_<granularity>.csv`` tables."""
    for granularity in GRANULARITIES:
        (folder / granularity).mkdir(parents=True, exist_ok=True)
    for region, maps in zip(prepared.regions, prepared.maps):
        for granularity in GRANULARITIES:
            path = folder / granularity / f"{region.name}.png"
            if not cv2.imwrite(str(path), maps.class_maps[granularity]):
                raise ConfigError(f"cannot write {path}; check that --export points to a writable folder")

    names = np.array(prepared.class_map.names)
    region_names = np.array([region.name for region in prepared.regions])
    for (size, granularity), table in prepared.windows.items():
        rows = pd.DataFrame(
            {
                "region": region_names[table["region"].to_numpy()],
                "x": table["x"],
                "y": table["y"],
                "size": table["size"],
                "label": names[table["label"].to_numpy()],
            }
        )
        rows.to_csv(folder / f"patches_{size}_{granularity}.csv", index=False)


def _figure_region(prepared: PreparedDataset) -> int:
    """Pick the region that shows the most classes, then the most nuclei, for the annotation figure."""
    scores = [(len(set(maps.nucleus_classes.tolist())), len(maps.nucleus_ids)) for maps in prepared.maps]
    return max(range(len(scores)), key=lambda index: scores[index])


def log_prepare_run(prepared: PreparedDataset, args: argparse.Namespace, patch_sizes: tuple[int, ...]) -> str:
    """Log the prepare run: options, nucleus and window counts, the annotation figure and the dataset input."""
    import mlflow

    with mlflow.start_run(run_name=f"prepare-{prepared.name}") as active:
        mlflow.set_tags(
            {
                keys.TAG_TASK: "prepare",
                keys.TAG_DATASET: prepared.name,
                keys.TAG_DATASET_DIGEST: prepared.digest,
                keys.TAG_GIT_COMMIT: git_commit(),
            }
        )
        log_params_once(
            active.info.run_id,
            {
                "dataset": str(args.dataset),
                "format": prepared.format,
                "class_map": str(args.class_map),
                "label_scheme": prepared.class_map.scheme,
                "patch_sizes": ",".join(map(str, patch_sizes)),
                "stride": args.stride,
            },
        )

        metrics = {"regions": len(prepared.regions), "ellipse_fallbacks": prepared.ellipse_fallbacks}
        nuclei = prepared.nucleus_counts()
        metrics["nuclei_total"] = sum(nuclei.values())
        metrics["nuclei_cut"] = int(sum(maps.cut.sum() for maps in prepared.maps))
        metrics.update({f"nuclei_{name}": count for name, count in nuclei.items()})
        for (size, granularity), counts in prepared.window_counts().items():
            metrics[f"patches_{size}_{granularity}"] = sum(counts.values())
            metrics.update({f"patches_{size}_{granularity}_{name}": count for name, count in counts.items()})
        metrics.update({f"time_{name}": value for name, value in prepared.timings.items()})
        mlflow.log_metrics(metrics)

        regions = pd.DataFrame(
            {
                "region": [region.name for region in prepared.regions],
                "group": prepared.groups,
                "source": [region.source for region in prepared.regions],
                "nuclei": [len(maps.nucleus_ids) for maps in prepared.maps],
            }
        )
        dataset_input = mlflow.data.from_pandas(regions, source=str(Path(args.dataset).resolve()), name=prepared.name, digest=prepared.digest[:16])
        mlflow.log_input(dataset_input, context="prepare")

        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            index = _figure_region(prepared)
            region = prepared.regions[index]
            from granularity.data.visualize import annotation_figure

            figure = annotation_figure(
                region.image,
                {g: prepared.maps[index].class_maps[g] for g in GRANULARITIES},
                prepared.class_map,
                title=f"{prepared.name} / {region.name}: annotations at three granularities",
            )
            figure.savefig(folder / "annotation_granularities.png", dpi=110)
            import matplotlib.pyplot as plt

            plt.close(figure)
            regions.to_csv(folder / "regions.csv", index=False)
            mlflow.log_artifacts(str(folder))
            mlflow.log_dict(prepared.class_map.to_dict(), "class_map.yaml")
        return active.info.run_id
