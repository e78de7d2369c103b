"""The prepared dataset: regions, their granularity maps and labelled windows, cached on disk.

A cache entry is keyed by a digest of the input files (their bytes), the
reader format, the class map and the conversion code version. It contains the
derived ellipse and box instance maps of every region and the window tables
of every (patch size, stride, granularity) asked for so far. Images and
outlines are read from the input again on every load, because decoding them
is the floor of the work anyway and a copy would double the disk use.

Every write goes to a temporary name first and is renamed into place, so an
interrupted run leaves no half-written entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from granularity.data.class_map import ClassMap
from granularity.data.granularity import GRANULARITIES, GranularityMaps, derive_granularities
from granularity.data.patches import label_all_windows
from granularity.data.readers import detect_format, input_files, read_regions
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

# Bump when the conversion or labelling rules change, so old cache entries are not reused.
CACHE_VERSION = 1

DEFAULT_PATCH_SIZES = (32, 64, 128)


@dataclass
class PreparedDataset:
    """Everything the training tasks read, computed once per input and options.

    Attributes:
        name: dataset name (the folder name of the input).
        digest: hex digest of the input files, format, class map and code
            version; also the cache key.
        class_map: the class map the labels were mapped through.
        regions: the regions in reading order.
        maps: the granularity maps of each region, aligned with ``regions``.
            ``class_union`` is left empty after the windows are labelled,
            because it is the largest field and only labelling reads it.
        windows: (patch_size, granularity) -> table of every kept window before
            balancing, with columns ``region`` (index into ``regions``), ``x``,
            ``y``, ``size`` and ``label`` (class index).
        format: the reader format used.
        stride: stride of the windows, or None for half the patch size.
        cache_dir: the folder the cache entry lives in, or None without a cache.
        ellipse_fallbacks: nuclei whose ellipse is the one inscribed in their box.
        cache_hit: True when the maps came from the cache.
    """

    name: str
    digest: str
    class_map: ClassMap
    regions: list[Region]
    maps: list[GranularityMaps]
    windows: dict[tuple[int, str], pd.DataFrame]
    format: str = ""
    stride: int | None = None
    cache_dir: Path | None = None
    ellipse_fallbacks: int = 0
    cache_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return [region.group for region in self.regions]

    def nucleus_counts(self) -> dict[str, int]:
        """Return the number of nuclei per class name, counted per region."""
        counts = np.zeros(self.class_map.num_classes, dtype=np.int64)
        for maps in self.maps:
            counts += np.bincount(maps.nucleus_classes, minlength=self.class_map.num_classes)
        return dict(zip(self.class_map.names, counts.tolist()))

    def window_counts(self) -> dict[tuple[int, str], dict[str, int]]:
        """Return (patch_size, granularity) -> windows per class name, before balancing."""
        result = {}
        for key, table in self.windows.items():
            counts = np.bincount(table["label"].to_numpy(), minlength=self.class_map.num_classes)
            result[key] = dict(zip(self.class_map.names, counts.tolist()))
        return result


def default_cache_root() -> Path:
    """Return ``GRANULARITY_CACHE`` if set, else ``.cache/granularity`` in the working directory."""
    return Path(os.environ.get("GRANULARITY_CACHE") or Path.cwd() / ".cache" / "granularity")


def dataset_digest(files: list[Path], root: Path, format: str, class_map: ClassMap) -> str:
    """Return the hex SHA-256 of the input files' relative paths and bytes, the format and the class map."""
    digest = hashlib.sha256()
    digest.update(f"granularity-cache-v{CACHE_VERSION}\0{format}\0".encode())
    digest.update(json.dumps(class_map.to_dict(), sort_keys=True).encode())
    for path in files:
        digest.update(b"\0" + str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _windows_file(entry: Path, patch_size: int, stride: int | None, granularity: str) -> Path:
    stride_text = "half" if stride is None else str(stride)
    return entry / "windows" / f"{patch_size}_{stride_text}_{granularity}.csv"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_maps(folder: Path, name: str, maps: GranularityMaps) -> None:
    """Write every field of ``maps`` except the class unions into one compressed .npz file."""
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for item in dataclasses.fields(maps):
        value = getattr(maps, item.name)
        if item.name == "class_union" or value is None:
            continue
        if isinstance(value, dict):
            kinds[item.name] = "dict"
            arrays.update({f"{item.name}__{key}": np.asarray(array) for key, array in value.items()})
        elif isinstance(value, list):
            kinds[item.name] = "list"
            arrays[item.name] = np.asarray(value, dtype=np.int64)
        elif isinstance(value, np.ndarray):
            kinds[item.name] = "array"
            arrays[item.name] = value
        else:
            kinds[item.name] = "scalar"
            arrays[item.name] = np.asarray(value)
    arrays["__kinds__"] = np.asarray(json.dumps(kinds))
    np.savez_compressed(folder / f"{name}.npz", **arrays)


def _load_maps(path: Path) -> GranularityMaps:
    """Read maps written by ``_save_maps``; the class unions are left empty."""
    values: dict = {"class_union": {}}
    with np.load(path) as arrays:
        kinds = json.loads(str(arrays["__kinds__"]))
        for name, kind in kinds.items():
            if kind == "dict":
                prefix = f"{name}__"
                values[name] = {key[len(prefix):]: arrays[key] for key in arrays.files if key.startswith(prefix)}
            elif kind == "list":
                values[name] = arrays[name].tolist()
            elif kind == "array":
                values[name] = arrays[name]
            else:
                values[name] = arrays[name].item()
    return GranularityMaps(**values)


def _check_patch_sizes(regions: list[Region], patch_sizes: tuple[int, ...], dataset: Path) -> None:
    largest = max((min(region.shape) for region in regions), default=0)
    for size in patch_sizes:
        if size <= 0:
            raise DatasetError(f"patch size {size} is invalid; use positive sizes such as 32,64,128")
        if size > largest:
            raise DatasetError(
                f"patch size {size} is larger than every region of {dataset} (largest side {largest} px); "
                f"use patch sizes up to {largest}"
            )


def prepare_dataset(
    dataset: str | Path,
    format: str | None,
    class_map: str | Path | ClassMap,
    patch_sizes: tuple[int, ...] = DEFAULT_PATCH_SIZES,
    stride: int | None = None,
    cache_root: str | Path | None = None,
    use_cache: bool = True,
) -> PreparedDataset:
    """Read a dataset, derive its granularities and label its windows, reusing the cache.

    Args:
        dataset: the dataset folder (or file, for formats that allow one).
        format: a reader name, or None to detect it.
        class_map: a class map or the path of its YAML file.
        patch_sizes: window sizes to label; an empty tuple labels none (segmentation).
        stride: window stride in pixels, or None for half the patch size.
        cache_root: folder of cache entries; ``default_cache_root()`` when None.
        use_cache: read and write the cache. Without it everything is recomputed.
    """
    dataset = Path(dataset)
    if not dataset.exists():
        raise DatasetError(f"dataset {dataset} not found; pass the folder that holds the dataset with --dataset")
    if stride is not None and stride <= 0:
        raise DatasetError(f"stride {stride} is invalid; use a positive number of pixels, or 0 for half the patch size")
    if not isinstance(class_map, ClassMap):
        class_map = ClassMap.load(class_map)
    format = format or detect_format(dataset)
    patch_sizes = tuple(int(size) for size in patch_sizes)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    files = input_files(dataset, format)
    regions = read_regions(dataset, format, class_map)
    if not regions:
        raise DatasetError(f"dataset {dataset} contains no regions for format {format!r}; check the folder layout in README")
    _check_patch_sizes(regions, patch_sizes, dataset)
    timings["read_s"] = time.perf_counter() - started

    digest = dataset_digest(files, dataset, format, class_map)
    name = dataset.name if dataset.is_dir() else dataset.parent.name
    entry = Path(cache_root or default_cache_root()) / f"{name}-{digest[:16]}" if use_cache else None

    started = time.perf_counter()
    cache_hit = entry is not None and (entry / "manifest.json").is_file()
    if cache_hit:
        maps = [_load_maps(entry / "maps" / f"{region.name}.npz") for region in regions]
        logger.info("prepared dataset %s loaded from cache %s", name, entry)
    else:
        maps = [derive_granularities(region, class_map) for region in tqdm(regions, desc="granularities", unit="region", leave=False)]
        if entry is not None:
            _write_entry(entry, regions, maps, name, digest, format, class_map)
    timings["derive_s"] = time.perf_counter() - started

    started = time.perf_counter()
    windows = _windows(entry, regions, maps, patch_sizes, stride, class_map)
    timings["label_s"] = time.perf_counter() - started

    # The per-class unions are the largest field and only labelling reads them.
    for region_maps in maps:
        region_maps.class_union = {}

    fallbacks = sum(region_maps.ellipse_fallbacks for region_maps in maps)
    return PreparedDataset(
        name=name,
        digest=digest,
        class_map=class_map,
        regions=regions,
        maps=maps,
        windows=windows,
        format=format,
        stride=stride,
        cache_dir=entry,
        ellipse_fallbacks=fallbacks,
        cache_hit=cache_hit,
        timings=timings,
    )


def _windows(
    entry: Path | None,
    regions: list[Region],
    maps: list[GranularityMaps],
    patch_sizes: tuple[int, ...],
    stride: int | None,
    class_map: ClassMap,
) -> dict[tuple[int, str], pd.DataFrame]:
    """Return the labelled windows of every patch size and granularity, from the cache where present."""
    windows: dict[tuple[int, str], pd.DataFrame] = {}
    missing: list[tuple[int, str]] = []
    for size in patch_sizes:
        for granularity in GRANULARITIES:
            path = _windows_file(entry, size, stride, granularity) if entry is not None else None
            if path is not None and path.is_file():
                windows[(size, granularity)] = pd.read_csv(path, dtype=np.int64)
            else:
                missing.append((size, granularity))
    if not missing:
        return windows

    # Maps loaded from the cache have no class unions, so they are derived again for labelling.
    if any(not region_maps.class_union for region_maps in maps):
        for region, region_maps in zip(regions, maps):
            region_maps.class_union = derive_granularities(region, class_map).class_union
    labelled = label_all_windows(maps, sorted({size for size, _ in missing}), GRANULARITIES, stride)

    # Only a complete entry (its manifest is written last) takes window tables.
    complete_entry = entry is not None and (entry / "manifest.json").is_file()
    for size, granularity in missing:
        table = labelled[(size, granularity)][["region", "x", "y", "size", "label"]].astype(np.int64)
        windows[(size, granularity)] = table
        if complete_entry:
            _atomic_write_bytes(_windows_file(entry, size, stride, granularity), table.to_csv(index=False).encode())
    return windows


def _write_entry(
    entry: Path, regions: list[Region], maps: list[GranularityMaps], name: str, digest: str, format: str, class_map: ClassMap
) -> None:
    """Write the maps and manifest of a cache entry into a temporary folder, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
    try:
        (staging / "maps").mkdir()
        for region, region_maps in zip(regions, maps):
            _save_maps(staging / "maps", region.name, region_maps)
        manifest = {
            "cache_version": CACHE_VERSION,
            "dataset": name,
            "digest": digest,
            "format": format,
            "class_map": class_map.to_dict(),
            "regions": [{"name": r.name, "group": r.group, "source": r.source, "shape": list(r.shape)} for r in regions],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process finished the same entry first; its content is identical.
            if not (entry / "manifest.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
