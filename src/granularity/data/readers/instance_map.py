"""Reader for plain instance maps with a class table.

Layout of the dataset folder::

    images/<stem>.png|jpg|tif     the RGB image
    labels/<stem>.png|tif         the instance map: one channel, 0 = background,
                                  one integer id per nucleus (8, 16 or 32 bit)
    labels/<stem>.csv             header ``id,class``, one row per nucleus id;
                                  ``class`` is the raw label (id or name)
                                  looked up in the class map

Every image is its own region and group, named by its stem. Ids need not be
contiguous; rows for ids absent from the map are ignored.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from granularity.data.class_map import ClassMap
from granularity.data.images import load_label_image, load_rgb
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
)
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

LABEL_SUFFIXES = (".png", ".tif", ".tiff")

# Region.class_map_image builds a lookup table of max id + 1 entries, so
# sparse ids above this bound are renumbered 1..N to keep that table small.
_MAX_KEPT_ID = 1 << 20


def matches(root: Path) -> bool:
    return root.is_dir() and (root / "images").is_dir() and (root / "labels").is_dir()


def _samples(root: Path) -> list[tuple[str, Path, Path, Path]]:
    """Return (stem, image, instance map, class table) for every region, sorted by stem."""
    require_folder(root, "instance-map dataset folder")
    for folder in ("images", "labels"):
        if not (root / folder).is_dir():
            raise DatasetError(
                f"instance-map dataset folder {root} has no {folder}/ folder; put the RGB images in images/ "
                "and the instance maps with their .csv class tables in labels/"
            )

    images = index_by_stem(files_with_suffixes(root / "images", IMAGE_SUFFIXES), "image")
    maps = index_by_stem(files_with_suffixes(root / "labels", LABEL_SUFFIXES), "instance map")
    tables = index_by_stem(files_with_suffixes(root / "labels", (".csv",)), "class table")
    if not images and not maps:
        raise DatasetError(f"instance-map dataset folder {root} has no images and no instance maps; add them under images/ and labels/")

    pairs = pair_by_stem(images, maps, "instance map", f"{root / 'labels'}/{{stem}}.png")
    tables_only = sorted(set(tables) - set(maps))
    if tables_only:
        raise DatasetError(
            f"class table {tables[tables_only[0]]} has no instance map {tables_only[0]}.png or .tif beside it; "
            "add the instance map or remove the table"
        )
    samples = []
    for stem, image, instance_map in pairs:
        if stem not in tables:
            raise DatasetError(
                f"instance map {instance_map} has no class table {root / 'labels' / (stem + '.csv')}; "
                "add it with the header 'id,class' and one row per nucleus id"
            )
        samples.append((stem, image, instance_map, tables[stem]))
    return samples


def input_files(root: Path) -> list[Path]:
    return sorted(path for _, image, instance_map, table in _samples(root) for path in (image, instance_map, table))


def _raw_label(text: str):
    """Return integer-looking labels as int, so "2", "2.0" and 2 match one class-map entry."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


def read_class_table(path: Path) -> dict[int, object]:
    """Read a CSV with the header ``id,class`` into id -> raw label."""
    if path.stat().st_size == 0:
        raise DatasetError(f"class table {path} is empty (0 bytes); write the header 'id,class' and one row per nucleus")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [name.strip().lower() for name in reader.fieldnames or []]
        if "id" not in fields or "class" not in fields:
            raise DatasetError(f"class table {path} has the header {reader.fieldnames}; it needs the columns 'id,class'")
        reader.fieldnames = fields

        table: dict[int, object] = {}
        for line, row in enumerate(reader, start=2):
            try:
                instance_id = int(float(row["id"]))
            except (TypeError, ValueError) as error:
                raise DatasetError(f"class table {path}, line {line}: id {row['id']!r} is not an integer; fix the row") from error
            if instance_id in table:
                raise DatasetError(f"class table {path}, line {line}: id {instance_id} appears twice; keep one row per id")
            label = (row["class"] or "").strip()
            if not label:
                raise DatasetError(f"class table {path}, line {line}: id {instance_id} has no class; fill in the 'class' column")
            table[instance_id] = _raw_label(label)
    return table


def _instances(path: Path) -> np.ndarray:
    labels = load_label_image(path)
    if labels.dtype != np.bool_ and labels.min(initial=0) < 0:
        raise DatasetError(f"instance map {path} contains negative ids; use 0 for background and positive nucleus ids")
    if int(labels.max(initial=0)) > np.iinfo(np.int32).max:
        raise DatasetError(f"instance map {path} contains ids above {np.iinfo(np.int32).max}; renumber the nuclei 1..N")
    return labels.astype(np.int32)


def _read_sample(sample: tuple[str, Path, Path, Path]) -> tuple[Region, dict[int, object]]:
    stem, image_path, map_path, table_path = sample
    image = load_rgb(image_path)
    instances = _instances(map_path)
    check_same_size(image, instances.shape, image_path, map_path)
    table = read_class_table(table_path)

    ids = present_ids(instances)
    missing = [int(i) for i in ids if int(i) not in table]
    if missing:
        raise DatasetError(
            f"class table {table_path} has no row for nucleus ids {missing[:10]}"
            f"{' and more' if len(missing) > 10 else ''} of {map_path}; add one row per id"
        )
    raw = {int(i): table[int(i)] for i in ids}

    if ids.size and ids[-1] > _MAX_KEPT_ID:
        # Position in [0, id_1, id_2, ...] is the new id, and background stays 0.
        instances = np.searchsorted(np.concatenate(([0], ids)), instances).astype(np.int32)
        raw = {new_id: raw[int(old_id)] for new_id, old_id in enumerate(ids, start=1)}
        logger.info("%s: renumbered %d sparse nucleus ids to 1..%d", map_path, ids.size, ids.size)

    return Region(name=stem, group=stem, image=image, instances=instances, source=str(map_path)), raw


def read(root: Path, class_map: ClassMap) -> list[Region]:
    """Read every image, instance map and class table under ``root`` into regions."""
    samples = _samples(root)

    results = map_in_threads(_read_sample, samples, desc=f"reading {root.name}")
    regions = [region for region, _ in results]
    raw_labels = [raw for _, raw in results]

    mapped = map_classes(raw_labels, class_map, source=str(root), sources=[r.source for r in regions])
    for region, classes in zip(regions, mapped):
        region.classes = classes
    logger.info("read %d regions with %d nuclei from %s", len(regions), sum(len(r.classes) for r in regions), root)
    return regions
