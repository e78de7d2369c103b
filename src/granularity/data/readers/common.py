"""Steps shared by the readers: pairing files by stem, drawing nucleus shapes, mapping classes."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import cv2
import numpy as np
from tqdm import tqdm

from granularity.data.class_map import ClassMap
from granularity.data.images import load_rgb
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# Polygon vertices are passed to cv2.fillPoly as fixed-point numbers with this
# many fractional bits, so sub-pixel vertices (ImageScope, QuPath) are not
# rounded to whole pixels before filling.
_SUBPIXEL_BITS = 4


def map_in_threads(function: Callable[[Item], Result], items: Sequence[Item], desc: str) -> list[Result]:
    """Apply ``function`` to every item in a thread pool and return the results in item order.

    cv2.imread and the zlib decompression inside scipy.io.loadmat release the
    GIL, so on a multi-core machine several files decode at once. The first
    failing item, in item order, raises its exception here.
    """
    workers = min(8, os.cpu_count() or 1, max(len(items), 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, unit="file", leave=False))


def require_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise DatasetError(f"{what} {path} not found; pass --dataset pointing to an existing dataset folder")
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is not a folder; pass the folder that contains it")


def files_with_suffixes(folder: Path, suffixes: Sequence[str], recursive: bool = False) -> list[Path]:
    """Return the files in a folder whose suffix is one of ``suffixes`` (case-insensitive), sorted."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def index_by_stem(files: Iterable[Path], kind: str) -> dict[str, Path]:
    """Map file stems to files, raising when two files of one kind share a stem."""
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise DatasetError(
                f"two {kind} files share the name {path.stem!r}: {by_stem[path.stem]} and {path}; "
                "rename or remove one so every region has one file"
            )
        by_stem[path.stem] = path
    return by_stem


def pair_by_stem(
    images: dict[str, Path], labels: dict[str, Path], label_kind: str, label_hint: str
) -> list[tuple[str, Path, Path]]:
    """Pair images with label files of the same stem, raising on any file left alone.

    Returns (stem, image, label) triples sorted by stem.
    """
    images_only = sorted(set(images) - set(labels))
    if images_only:
        example = images[images_only[0]]
        raise DatasetError(
            f"image {example} has no {label_kind} file ({len(images_only)} images without one); "
            f"add {label_hint.format(stem=images_only[0])} or remove the image"
        )
    labels_only = sorted(set(labels) - set(images))
    if labels_only:
        example = labels[labels_only[0]]
        raise DatasetError(
            f"{label_kind} file {example} has no image of the same name ({len(labels_only)} such files); "
            f"add the image {labels_only[0]}.png (or .jpg/.tif) or remove the {label_kind} file"
        )
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def check_same_size(image: np.ndarray, label_shape: tuple[int, int], image_path: Path, label_path: Path) -> None:
    if tuple(image.shape[:2]) != tuple(label_shape):
        raise DatasetError(
            f"image {image_path} is {image.shape[1]} x {image.shape[0]} px but its label {label_path} is "
            f"{label_shape[1]} x {label_shape[0]} px; use the label file drawn on this image"
        )


@dataclass
class ShapeMask:
    """One nucleus as a boolean mask inside its bounding box, placed at (top, left) in the region."""

    top: int
    left: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def crop_to_mask(full: np.ndarray) -> ShapeMask | None:
    """Return the full-size boolean mask cropped to its bounding box, or None when empty."""
    rows = np.flatnonzero(full.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(full.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return ShapeMask(int(top), int(left), full[top:bottom, left:right].astype(bool))


def rasterise_polygons(polygons: Sequence[Sequence[np.ndarray]], shape: tuple[int, int]) -> ShapeMask | None:
    """Fill polygons with holes into a mask clipped to a region of ``shape`` (H, W).

    Each polygon is a list of rings: the outline first, then its holes, each an
    N x 2 array of (x, y) vertices. A vertex (x, y) is the centre of the pixel
    in column x and row y, as in cv2.fillPoly and cv2.findContours, so an
    outline traced with cv2.findContours fills back to the same pixels. Pixels
    on an outline count as inside; pixels on a hole's outline are cut out with
    the hole. Returns None when nothing lies inside the region.
    """
    rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for polygon in polygons for ring in polygon]
    rings = [ring for ring in rings if len(ring) >= 1 and np.isfinite(ring).all()]
    if not rings:
        return None
    everything = np.concatenate(rings)
    left = max(int(np.floor(everything[:, 0].min())), 0)
    top = max(int(np.floor(everything[:, 1].min())), 0)
    right = min(int(np.ceil(everything[:, 0].max())) + 1, shape[1])
    bottom = min(int(np.ceil(everything[:, 1].max())) + 1, shape[0])
    if right <= left or bottom <= top:
        return None

    # Draw into the clipped bounding box only, so a region with thousands of
    # nuclei never keeps one full-size mask per nucleus.
    local = np.zeros((bottom - top, right - left), dtype=np.uint8)
    scale = 1 << _SUBPIXEL_BITS
    offset = np.array([left, top], dtype=np.float64)
    for polygon in polygons:
        for ring_index, ring in enumerate(polygon):
            ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
            if len(ring) == 0 or not np.isfinite(ring).all():
                continue
            points = np.round((ring - offset) * scale).astype(np.int32)
            value = 1 if ring_index == 0 else 0
            cv2.fillPoly(local, [points], value, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)

    shape_mask = crop_to_mask(local)
    if shape_mask is None:
        return None
    return ShapeMask(shape_mask.top + top, shape_mask.left + left, shape_mask.mask)


def paint_instances(shapes: Sequence[ShapeMask | None], shape: tuple[int, int], source: Path) -> np.ndarray:
    """Draw shapes into an int32 instance map; shape k gets id k + 1.

    Where two shapes overlap, the pixel goes to the smaller nucleus: its
    outline is the more specific claim, and drawing the larger one on top
    could swallow a small nucleus whole. Ties go to the later shape. A shape
    that is None, or lies wholly under smaller ones, leaves no pixel and so
    no id in the map.
    """
    instances = np.zeros(shape, dtype=np.int32)
    areas = [shape_mask.area if shape_mask is not None else 0 for shape_mask in shapes]
    order = sorted((k for k, area in enumerate(areas) if area > 0), key=lambda k: (-areas[k], k))
    for k in order:
        shape_mask = shapes[k]
        height, width = shape_mask.mask.shape
        window = instances[shape_mask.top : shape_mask.top + height, shape_mask.left : shape_mask.left + width]
        window[shape_mask.mask] = k + 1

    empty = sum(1 for area in areas if area == 0)
    if empty:
        logger.warning("%s: %d annotations cover no pixel inside the image and were skipped", source, empty)
    hidden = len(order) - present_ids(instances).size
    if hidden:
        logger.warning("%s: %d nuclei lie wholly under smaller overlapping nuclei and were dropped", source, hidden)
    return instances


def present_ids(instances: np.ndarray) -> np.ndarray:
    """Return the sorted nonzero ids of an instance map."""
    largest = int(instances.max(initial=0))
    if largest <= 4 * instances.size:
        # bincount is several times faster than np.unique while ids are dense.
        # ravel("K") avoids a copy of the Fortran-ordered maps scipy.io.loadmat returns.
        ids = np.flatnonzero(np.bincount(instances.ravel("K"), minlength=1))
    else:
        ids = np.unique(instances)
    return ids[ids != 0]


def map_classes(
    raw_labels_per_region: Sequence[dict[int, object]], class_map: ClassMap, source: str, sources: Sequence[str]
) -> list[dict[int, int]]:
    """Resolve the class map's label scheme over the whole dataset, then map every nucleus.

    ``raw_labels_per_region[i]`` maps the ids present in region i to raw
    labels; ``sources[i]`` names region i's annotation file for messages.
    """
    every_label = {label for raw in raw_labels_per_region for label in raw.values()}
    class_map.resolve_scheme(every_label, source=source)

    # Map each distinct raw label once; the per-nucleus step is then a dict lookup.
    index_of_label: dict[object, int] = {}
    mapped = []
    for raw, region_source in zip(raw_labels_per_region, sources):
        classes = {}
        for instance_id, label in raw.items():
            if label not in index_of_label:
                index_of_label[label] = class_map.class_index(label, source=region_source)
            classes[int(instance_id)] = index_of_label[label]
        mapped.append(classes)
    return mapped


def tile_of(name: str) -> str:
    """Return the tile a patch was cut from: ``train_7_013`` -> ``train_7``.

    Only names of the form ``<tile>_<number>`` whose tile itself ends in
    ``_<number>`` are patches; any other name (``train_7`` of the full
    CoNSeP tiles) is its own tile, so no two whole tiles fall into one group.
    """
    tile, separator, patch = name.rpartition("_")
    if separator and patch.isdigit():
        _, tile_separator, tile_number = tile.rpartition("_")
        if tile_separator and tile_number.isdigit():
            return tile
    return name


def read_outline_files(
    root: Path,
    pairs: Sequence[tuple[str, Path, Path]],
    parse: Callable[[Path, tuple[int, int]], tuple[list[ShapeMask | None], list[object]]],
    class_map: ClassMap,
) -> list[Region]:
    """Read (name, image, annotation file) pairs whose files list one outline per nucleus into regions.

    ``parse(annotation_path, image_shape)`` returns one rasterised shape and
    one raw class label per nucleus; overlaps are resolved by ``paint_instances``.
    """
    def read_pair(pair: tuple[str, Path, Path]) -> tuple[Region, dict[int, object]]:
        stem, image_path, label_path = pair
        image = load_rgb(image_path)
        shapes, labels = parse(label_path, image.shape[:2])
        instances = paint_instances(shapes, image.shape[:2], label_path)
        raw = {int(i): labels[i - 1] for i in present_ids(instances)}
        return Region(name=stem, group=stem, image=image, instances=instances, source=str(label_path)), raw

    results = map_in_threads(read_pair, pairs, desc=f"reading {root.name}")
    regions = [region for region, _ in results]
    raw_labels = [raw for _, raw in results]

    mapped = map_classes(raw_labels, class_map, source=str(root), sources=[r.source for r in regions])
    for region, classes in zip(regions, mapped):
        region.classes = classes
    logger.info("read %d regions with %d nuclei from %s", len(regions), sum(len(r.classes) for r in regions), root)
    return regions


def pair_outline_files(root: Path, suffix: str, label_kind: str, dataset_kind: str, image_suffixes: Sequence[str]) -> list[tuple[str, Path, Path]]:
    """Return (name, image, annotation file) pairs of a folder, or of one annotation file with its image beside it."""
    if root.is_file():
        labels = {root.stem: root}
        images = index_by_stem((p for p in files_with_suffixes(root.parent, image_suffixes) if p.stem == root.stem), "image")
        return pair_by_stem(images, labels, label_kind, "{stem}")
    require_folder(root, f"{dataset_kind} dataset folder")
    labels = index_by_stem(files_with_suffixes(root, (suffix,), recursive=True), label_kind)
    if not labels:
        raise DatasetError(f"{dataset_kind} dataset folder {root} has no {suffix} {label_kind} files; add them or choose another --format")
    images = index_by_stem(files_with_suffixes(root, image_suffixes, recursive=True), "image")
    return pair_by_stem(images, labels, label_kind, "{stem}" + suffix)
