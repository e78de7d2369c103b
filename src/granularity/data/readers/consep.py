"""Reader for the CoNSeP layout: ``<Split>/Images/<name>.png|jpg`` and ``<Split>/Labels/<name>.mat``.

Each .mat file (MATLAB, read with scipy.io.loadmat) contains ``inst_map``
(H x W, 0 = background, nucleus ids that need not be contiguous) and
``inst_type`` (N x 1, row k = raw class of nucleus k + 1). ``type_map`` is
not read: it repeats ``inst_type`` pixel by pixel, and skipping it keeps
reading close to the bare decoding time. The dataset root may hold several splits (``Train/``, ``Test/``) or be one split
itself. Region names are file stems; when two splits share a stem, the split
folder name is put in front of every name of that stem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from granularity.data.class_map import ClassMap
from granularity.data.images import load_rgb
from granularity.data.readers.common import (
    IMAGE_SUFFIXES,
    check_same_size,
    files_with_suffixes,
    index_by_stem,
    map_classes,
    map_in_threads,
    pair_by_stem,
    present_ids,
    require_folder,
    tile_of,
)
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

@dataclass
class _Sample:
    name: str
    split: str
    image: Path
    label: Path


def split_folders(root: Path) -> list[Path]:
    """Return the folders under ``root`` (or ``root`` itself) that hold ``Images/`` and ``Labels/``."""
    if (root / "Images").is_dir() and (root / "Labels").is_dir():
        return [root]
    return sorted(child for child in root.iterdir() if (child / "Images").is_dir() and (child / "Labels").is_dir())


def matches(root: Path) -> bool:
    return root.is_dir() and bool(split_folders(root))


def _samples(root: Path) -> list[_Sample]:
    require_folder(root, "CoNSeP dataset folder")
    splits = split_folders(root)
    if not splits:
        raise DatasetError(
            f"CoNSeP dataset folder {root} has no Images/ and Labels/ folders, neither itself nor in a split "
            "folder such as Train/; pass the folder that contains them or choose another --format"
        )

    samples = []
    for split in splits:
        images = index_by_stem(files_with_suffixes(split / "Images", IMAGE_SUFFIXES), "image")
        labels = index_by_stem(files_with_suffixes(split / "Labels", (".mat",)), "label")
        if not images and not labels:
            raise DatasetError(f"CoNSeP split {split} has no images and no .mat labels; remove the folder or fill it")
        for stem, image, label in pair_by_stem(images, labels, ".mat label", f"{split / 'Labels'}/{{stem}}.mat"):
            samples.append(_Sample(stem, split.name, image, label))

    # Region names are used as file names downstream, so they must be unique.
    stems = [sample.name for sample in samples]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    for sample in samples:
        if sample.name in shared:
            sample.name = f"{sample.split.lower()}_{sample.name}"
    return samples


def input_files(root: Path) -> list[Path]:
    return sorted(path for sample in _samples(root) for path in (sample.image, sample.label))


def _load_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.stat().st_size == 0:
        raise DatasetError(f"label file {path} is empty (0 bytes); replace it with the dataset's .mat file")
    try:
        content = scipy.io.loadmat(path, variable_names=("inst_map", "inst_type"))
    except Exception as error:  # scipy raises ValueError, TypeError or OSError for broken files
        raise DatasetError(f"label file {path} could not be read as a MATLAB file ({error}); replace the corrupt file") from error

    for key in ("inst_map", "inst_type"):
        if key not in content:
            found = sorted(k for k in content if not k.startswith("__"))
            raise DatasetError(
                f"label file {path} has no {key!r} (found {found}); CoNSeP labels need 'inst_map' and 'inst_type'"
            )

    # The official release stores both as float64, consep-256 as int32.
    inst_map = np.asarray(content["inst_map"])
    if inst_map.ndim != 2:
        raise DatasetError(f"label file {path}: 'inst_map' has shape {inst_map.shape}, expected H x W")
    if not np.issubdtype(inst_map.dtype, np.integer):
        if not np.all(np.mod(inst_map, 1) == 0):
            raise DatasetError(f"label file {path}: 'inst_map' contains non-integer ids; export integer instance ids")
    # scipy returns MATLAB's column-major layout; later steps expect C order.
    inst_map = np.ascontiguousarray(inst_map, dtype=np.int32)
    if inst_map.min(initial=0) < 0:
        raise DatasetError(f"label file {path}: 'inst_map' contains negative ids; use 0 for background and 1..N for nuclei")

    inst_type = np.asarray(content["inst_type"]).reshape(-1)
    return inst_map, inst_type


def _raw_labels(inst_map: np.ndarray, inst_type: np.ndarray, path: Path) -> dict[int, object]:
    ids = present_ids(inst_map)
    if ids.size and ids[-1] > inst_type.size:
        raise DatasetError(
            f"label file {path}: 'inst_type' has {inst_type.size} rows but 'inst_map' contains nucleus id {ids[-1]}; "
            "'inst_type' needs one row per id up to the largest id (row k = class of id k + 1)"
        )
    labels = inst_type[ids - 1]
    return {int(i): (int(label) if float(label).is_integer() else float(label)) for i, label in zip(ids, labels)}


def _read_sample(sample: _Sample) -> tuple[Region, dict[int, object]]:
    inst_map, inst_type = _load_label(sample.label)
    image = load_rgb(sample.image)
    check_same_size(image, inst_map.shape, sample.image, sample.label)
    raw = _raw_labels(inst_map, inst_type, sample.label)
    region = Region(
        name=sample.name,
        group=tile_of(sample.name),
        image=image,
        instances=inst_map,
        source=str(sample.label),
    )
    return region, raw


def read(root: Path, class_map: ClassMap) -> list[Region]:
    """Read every split of a CoNSeP dataset into regions with project class indices."""
    samples = _samples(root)
    results = map_in_threads(_read_sample, samples, desc=f"reading {root.name}")
    regions = [region for region, _ in results]
    raw_labels = [raw for _, raw in results]

    mapped = map_classes(raw_labels, class_map, source=str(root), sources=[r.source for r in regions])
    for region, classes in zip(regions, mapped):
        region.classes = classes
    logger.info("read %d regions from %s (%d tiles)", len(regions), root, len({r.group for r in regions}))
    return regions
