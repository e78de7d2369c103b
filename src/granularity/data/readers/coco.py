"""Reader for COCO instance JSON: one annotation per nucleus, as RLE (plain or compressed) or polygons.

The dataset is a JSON file, or a folder holding ``annotations.json`` (or a
single other ``*.json``). Images are found at ``images/<file_name>`` beside the
JSON, or at ``<file_name>`` beside it. The raw label of a nucleus is its
category name. Every image is its own region and group, named by the stem of
its file name; nucleus ids are renumbered 1..N per image in annotation order,
so ids stay small whatever the annotation ids are. Crowd annotations
(``iscrowd`` = 1) do not outline one nucleus and are skipped.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import numpy as np

from granularity.data.class_map import ClassMap
from granularity.data.images import load_rgb
from granularity.data.readers import rle
from granularity.data.readers.common import (
    ShapeMask,
    check_same_size,
    crop_to_mask,
    map_classes,
    map_in_threads,
    paint_instances,
    present_ids,
    rasterise_polygons,
)
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

ANNOTATION_FILE = "annotations.json"


def _json_candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.is_file() and not p.name.startswith("."))


def matches(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".json"
    return path.is_dir() and ((path / ANNOTATION_FILE).is_file() or bool(_json_candidates(path)))


def annotation_file(path: Path) -> Path:
    """Return the COCO JSON of a dataset given as the JSON file itself or its folder."""
    if not path.exists():
        raise DatasetError(f"COCO dataset {path} not found; pass the annotation JSON or the folder that contains it")
    if path.is_file():
        return path
    if (path / ANNOTATION_FILE).is_file():
        return path / ANNOTATION_FILE
    candidates = _json_candidates(path)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DatasetError(f"COCO dataset folder {path} has no {ANNOTATION_FILE} or other .json file; add the annotation JSON, or pick the --format that matches the folder")
    names = [p.name for p in candidates]
    raise DatasetError(f"COCO dataset folder {path} contains several JSON files {names}; pass the annotation JSON itself as --dataset")


def _load_json(path: Path) -> dict:
    if path.stat().st_size == 0:
        raise DatasetError(f"COCO file {path} is empty (0 bytes); replace it with the annotation JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"COCO file {path} is not valid JSON ({error}); fix or replace the file") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DatasetError(f"COCO file {path} lacks the 'images' and 'annotations' lists; pass a COCO instance annotation file")
    return data


def _key(value):
    """Return an id as int when it is one, so 10 and "10" name the same image."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _image_path(json_path: Path, file_name: str) -> Path:
    folder = json_path.parent
    for candidate in (folder / "images" / file_name, folder / file_name, folder / "images" / Path(file_name).name):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"COCO file {json_path} lists image {file_name!r}, which is not in {folder / 'images'} or {folder}; "
        "add the image or remove its entry"
    )


def _images(json_path: Path, data: dict) -> dict:
    """Map image ids to (entry, image path), checking names are unique."""
    images = {}
    names: dict[str, object] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DatasetError(f"COCO file {json_path}: image entry {str(entry)[:80]} needs 'id' and 'file_name'")
        image_id = _key(entry["id"])
        name = Path(str(entry["file_name"])).stem
        if name in names:
            raise DatasetError(
                f"COCO file {json_path}: images {names[name]} and {image_id} share the file name stem {name!r}; "
                "region names must be unique, so rename one image"
            )
        names[name] = image_id
        images[image_id] = (entry, _image_path(json_path, str(entry["file_name"])))
    return images


def input_files(path: Path) -> list[Path]:
    json_path = annotation_file(path)
    data = _load_json(json_path)
    return sorted([json_path] + [image for _, image in _images(json_path, data).values()])


def _parse_text(value, what: str):
    """Parse a value stored as text, in JSON or Python literal syntax."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise rle.RleError(f"{what} {value[:40]!r} is neither JSON nor a Python literal") from error


def _segmentation_mask(segmentation, shape: tuple[int, int]) -> ShapeMask | None:
    """Decode one annotation's segmentation into a mask inside a region of ``shape``."""
    if isinstance(segmentation, str):
        segmentation = _parse_text(segmentation, "segmentation")

    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if isinstance(size, str):
            size = _parse_text(size, "RLE size")
        if counts is None or not isinstance(size, (list, tuple)) or len(size) != 2:
            raise rle.RleError(f"RLE needs 'counts' and 'size' [height, width], got keys {sorted(segmentation)}")
        height, width = int(size[0]), int(size[1])
        if (height, width) != tuple(shape):
            raise rle.RleError(f"RLE size {height} x {width} (h x w) differs from the image, {shape[0]} x {shape[1]}")
        # A compressed string never ends in "]": that character has the
        # continuation bit set, so it cannot close a value. A string ending
        # in "]" is a counts list stored as text.
        if isinstance(counts, str) and counts.rstrip().endswith("]"):
            counts = _parse_text(counts, "RLE counts")
        return crop_to_mask(rle.decode(counts, height, width))

    if isinstance(segmentation, list):
        polygons = []
        for part in segmentation:
            points = np.asarray(part, dtype=np.float64).reshape(-1)
            if points.size < 6 or points.size % 2:
                continue
            polygons.append([points.reshape(-1, 2)])
        return rasterise_polygons(polygons, shape) if polygons else None

    raise rle.RleError(f"segmentation of type {type(segmentation).__name__} is neither RLE nor a polygon list")


def _read_image(
    json_path: Path, entry: dict, image_path: Path, annotations: list[dict], categories: dict
) -> tuple[Region, dict[int, object]]:
    """Decode one image and its annotations into a region and its raw labels (category names)."""
    image = load_rgb(image_path)
    declared = (_key(entry.get("height", image.shape[0])), _key(entry.get("width", image.shape[1])))
    check_same_size(image, declared, image_path, json_path)

    shapes = []
    for annotation in annotations:
        try:
            shapes.append(_segmentation_mask(annotation.get("segmentation"), image.shape[:2]))
        except (rle.RleError, TypeError, ValueError) as error:
            raise DatasetError(
                f"COCO file {json_path}: annotation {annotation.get('id')} of image {entry['file_name']} has an "
                f"invalid segmentation ({error}); fix or remove the annotation"
            ) from error
    instances = paint_instances(shapes, image.shape[:2], json_path)

    # Shape k became id k + 1, so the id points back at its annotation.
    raw = {}
    for instance_id in present_ids(instances):
        annotation = annotations[instance_id - 1]
        raw[int(instance_id)] = categories[_key(annotation["category_id"])]

    name = Path(str(entry["file_name"])).stem
    return Region(name=name, group=name, image=image, instances=instances, source=str(json_path)), raw


def read(path: Path, class_map: ClassMap) -> list[Region]:
    """Read a COCO instance annotation file into one region per image."""
    json_path = annotation_file(path)
    data = _load_json(json_path)
    images = _images(json_path, data)
    categories = {_key(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", []) if isinstance(c, dict) and "id" in c}

    annotations_per_image: dict[object, list[dict]] = {image_id: [] for image_id in images}
    crowd = 0
    for annotation in data["annotations"]:
        image_id = _key(annotation.get("image_id"))
        if image_id not in annotations_per_image:
            raise DatasetError(
                f"COCO file {json_path}: annotation {annotation.get('id')} refers to image id {image_id!r}, "
                "which the 'images' list lacks; add the image entry or remove the annotation"
            )
        category = _key(annotation.get("category_id"))
        if category not in categories:
            raise DatasetError(
                f"COCO file {json_path}: annotation {annotation.get('id')} has category_id {category!r}, "
                f"which 'categories' lacks (known: {sorted(categories, key=str)}); add the category"
            )
        if _key(annotation.get("iscrowd", 0)) == 1:
            crowd += 1
            continue
        annotations_per_image[image_id].append(annotation)
    if crowd:
        logger.warning("%s: skipped %d crowd annotations (iscrowd = 1), which outline no single nucleus", json_path, crowd)

    def read_image(image_id) -> tuple[Region, dict[int, object]]:
        entry, image_path = images[image_id]
        return _read_image(json_path, entry, image_path, annotations_per_image[image_id], categories)

    results = map_in_threads(read_image, list(images), desc=f"reading {json_path.name}")
    regions = [region for region, _ in results]
    raw_labels = [raw for _, raw in results]

    mapped = map_classes(raw_labels, class_map, source=str(json_path), sources=[str(json_path)] * len(regions))
    for region, classes in zip(regions, mapped):
        region.classes = classes
    logger.info("read %d regions with %d nuclei from %s", len(regions), sum(len(r.classes) for r in regions), json_path)
    return regions
