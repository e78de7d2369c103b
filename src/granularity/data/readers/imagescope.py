"""Reader for Aperio ImageScope XML outlines next to their images (the MoNuSeg layout).

Every ``<stem>.xml`` anywhere under the dataset folder pairs with the image
``<stem>.tif``, ``.tiff`` or ``.png`` anywhere under it, so both MoNuSeg
layouts work: XML and TIFF in one folder, or ``Annotations/`` beside
``Tissue Images/``. Each ``Annotations/Annotation/Regions/Region`` is one
nucleus, outlined by ``Vertices/Vertex`` with float ``X`` and ``Y`` in
pixels. The raw label is the first non-empty of: the Region's ``Text``, a
value among the Region's attributes, the Annotation's ``Name``, a value
among the Annotation's attributes; otherwise ``nucleus``. Every image is its
own region and group.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from granularity.data.class_map import ClassMap
from granularity.data.readers.common import (
    ShapeMask,
    crop_to_mask,
    pair_outline_files,
    rasterise_polygons,
    read_outline_files,
)
from granularity.data.region import Region
from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
DEFAULT_LABEL = "nucleus"

# Aperio region types: 0 free-hand polygon, 1 rectangle, 2 ellipse given by
# two opposite corners of its box, 3 arrow, 4 ruler. Arrows and rulers mark
# no area.
_RECTANGLE = "1"
_ELLIPSE = "2"
_NO_AREA = {"3", "4"}


def matches(root: Path) -> bool:
    if root.is_file():
        return root.suffix.lower() == ".xml"
    return root.is_dir() and any(True for _ in root.rglob("*.xml"))


def _pairs(root: Path) -> list[tuple[str, Path, Path]]:
    return pair_outline_files(root, ".xml", "XML annotation", "ImageScope", IMAGE_SUFFIXES)


def input_files(root: Path) -> list[Path]:
    return sorted(path for _, image, label in _pairs(root) for path in (image, label))


def _first_attribute_value(element: ElementTree.Element) -> str:
    for attribute in element.findall("./Attributes/Attribute"):
        value = (attribute.get("Value") or "").strip()
        if value:
            return value
    return ""


def _label_of(region: ElementTree.Element, annotation: ElementTree.Element) -> str:
    candidates = (
        (region.get("Text") or "").strip(),
        _first_attribute_value(region),
        (annotation.get("Name") or "").strip(),
        _first_attribute_value(annotation),
    )
    return next((c for c in candidates if c), DEFAULT_LABEL)


def _vertices(region: ElementTree.Element, path: Path) -> np.ndarray:
    points = []
    for vertex in region.findall("./Vertices/Vertex"):
        try:
            points.append((float(vertex.get("X")), float(vertex.get("Y"))))
        except (TypeError, ValueError) as error:
            raise DatasetError(
                f"ImageScope file {path}: region {region.get('Id')} has a vertex with X={vertex.get('X')!r}, "
                f"Y={vertex.get('Y')!r}; every Vertex needs numeric X and Y"
            ) from error
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _ellipse_mask(corners: np.ndarray, shape: tuple[int, int]) -> ShapeMask | None:
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    radius_x, radius_y = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    top, left = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
    bottom, right = min(int(np.ceil(y1)) + 1, shape[0]), min(int(np.ceil(x1)) + 1, shape[1])
    if bottom <= top or right <= left:
        return None

    # Pixel centres inside the ellipse, tested only within its box.
    rows, cols = np.ogrid[top:bottom, left:right]
    inside = ((cols - centre_x) / radius_x) ** 2 + ((rows - centre_y) / radius_y) ** 2 <= 1.0
    local = crop_to_mask(inside)
    if local is None:
        return None
    return ShapeMask(local.top + top, local.left + left, local.mask)


def parse(path: Path, shape: tuple[int, int]) -> tuple[list[ShapeMask | None], list[str]]:
    """Parse one XML file into nucleus shapes and their raw labels, in file order."""
    if path.stat().st_size == 0:
        raise DatasetError(f"ImageScope file {path} is empty (0 bytes); replace it with the annotation XML")
    try:
        tree = ElementTree.parse(path)
    except ElementTree.ParseError as error:
        raise DatasetError(f"ImageScope file {path} is not valid XML ({error}); fix or replace the file") from error

    shapes: list[ShapeMask | None] = []
    labels: list[str] = []
    skipped = 0
    for annotation in tree.getroot().iter("Annotation"):
        for region in annotation.findall("./Regions/Region"):
            region_type = (region.get("Type") or "0").strip()
            points = _vertices(region, path)
            if region_type in _NO_AREA or len(points) == 0:
                skipped += 1
                continue
            if region_type == _ELLIPSE and len(points) >= 2:
                shapes.append(_ellipse_mask(points, shape))
            elif len(points) >= 3 or region_type == _RECTANGLE:
                shapes.append(rasterise_polygons([[points]], shape))
            else:
                skipped += 1
                continue
            labels.append(_label_of(region, annotation))
    if skipped:
        logger.warning("%s: skipped %d regions that outline no area (arrows, rulers or fewer than 3 vertices)", path, skipped)
    return shapes, labels


def read(root: Path, class_map: ClassMap) -> list[Region]:
    """Read every XML annotation and its image under ``root`` into regions."""
    return read_outline_files(root, _pairs(root), parse, class_map)
