"""Reader for QuPath GeoJSON exports next to their images.

Every ``<stem>.geojson`` anywhere under the dataset folder pairs with the
image ``<stem>.png``, ``.jpg``, ``.tif`` or ``.tiff`` anywhere under it. A
file is a FeatureCollection, a bare list of Features or one Feature; each
Feature is one nucleus. Polygon and MultiPolygon geometries are drawn with
every part filled and every hole cut out; a QuPath cell's
``nucleusGeometry`` is used in place of its cell outline. Other geometry
types (points, lines) mark no area and are skipped. The raw label is
``properties.classification.name``, or ``unclassified`` without one.
Coordinates are pixels of the full-resolution image. Every image is its own
region and group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from granularity.data.class_map import ClassMap
from granularity.data.readers.common import (
    IMAGE_SUFFIXES,
    ShapeMask,
    pair_outline_files,
    rasterise_polygons,
    read_outline_files,
)
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

UNCLASSIFIED = "unclassified"


def matches(root: Path) -> bool:
    if root.is_file():
        return root.suffix.lower() == ".geojson"
    return root.is_dir() and any(True for _ in root.rglob("*.geojson"))


def _pairs(root: Path) -> list[tuple[str, Path, Path]]:
    return pair_outline_files(root, ".geojson", "GeoJSON", "GeoJSON", IMAGE_SUFFIXES)


def input_files(root: Path) -> list[Path]:
    return sorted(path for _, image, label in _pairs(root) for path in (image, label))


def _features(data, path: Path) -> list[dict]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise DatasetError(
            f"GeoJSON file {path} is neither a FeatureCollection nor a list of Features; export it from QuPath as GeoJSON"
        )
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise DatasetError(f"GeoJSON file {path}: 'features' must be a list of Feature objects")
    return features


def _label_of(feature: dict) -> str:
    classification = (feature.get("properties") or {}).get("classification")
    if isinstance(classification, dict):
        name = classification.get("name")
    else:
        name = classification
    name = str(name).strip() if name is not None else ""
    return name or UNCLASSIFIED


def _polygons(geometry: dict, path: Path, index: int) -> list[list[np.ndarray]] | None:
    """Return a geometry's polygons as lists of rings (outline, then holes), or None if it has no area."""
    kind = geometry.get("type")
    coordinates = geometry.get("coordinates")
    try:
        if kind == "Polygon":
            return [[np.asarray(ring, dtype=np.float64)[:, :2] for ring in coordinates]]
        if kind == "MultiPolygon":
            return [[np.asarray(ring, dtype=np.float64)[:, :2] for ring in polygon] for polygon in coordinates]
    except (TypeError, ValueError, IndexError) as error:
        raise DatasetError(
            f"GeoJSON file {path}: feature {index} has invalid {kind} coordinates ({error}); "
            "each ring must be a list of [x, y] pairs"
        ) from error
    if kind == "GeometryCollection":
        parts = [_polygons(g, path, index) for g in geometry.get("geometries", []) if isinstance(g, dict)]
        polygons = [polygon for part in parts if part for polygon in part]
        return polygons or None
    return None


def parse(path: Path, shape: tuple[int, int]) -> tuple[list[ShapeMask | None], list[str]]:
    """Parse one GeoJSON file into nucleus shapes and their raw labels, in file order."""
    if path.stat().st_size == 0:
        raise DatasetError(f"GeoJSON file {path} is empty (0 bytes); replace it with the QuPath export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"GeoJSON file {path} is not valid JSON ({error}); fix or replace the file") from error

    shapes: list[ShapeMask | None] = []
    labels: list[str] = []
    skipped = 0
    for index, feature in enumerate(_features(data, path)):
        geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        polygons = _polygons(geometry, path, index) if isinstance(geometry, dict) else None
        if not polygons:
            skipped += 1
            continue
        shapes.append(rasterise_polygons(polygons, shape))
        labels.append(_label_of(feature))
    if skipped:
        logger.warning("%s: skipped %d features without a polygon geometry (points, lines or none)", path, skipped)
    return shapes, labels


def read(root: Path, class_map: ClassMap) -> list[Region]:
    """Read every GeoJSON file and its image under ``root`` into regions."""
    return read_outline_files(root, _pairs(root), parse, class_map)
