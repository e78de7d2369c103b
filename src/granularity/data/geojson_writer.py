"""Writing nuclei as a QuPath GeoJSON FeatureCollection.

Each nucleus of an instance map becomes one Polygon feature with
``properties.classification`` (name and RGB colour), so QuPath shows it in its
class colour. For predictions the instances are the connected components of
each predicted class. Vertices are pixel centres as traced by cv2.findContours: the
project's GeoJSON reader fills such an outline back to the same pixels. Only
outer outlines are written, because a nucleus has no holes; a hole inside a
nucleus is filled.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from granularity.data.class_map import ClassMap
from granularity.errors import UserError

logger = logging.getLogger(__name__)

# QuPath distinguishes annotations (drawn by hand) from detections (found by an algorithm).
OBJECT_TYPE = "detection"


# Predicted components smaller than this are speckle, not nuclei: a nucleus at 20x covers well over 10 pixels.
MIN_NUCLEUS_AREA_PX = 10


def _outline(nucleus: np.ndarray) -> list[list[int]] | None:
    """Return the closed outer ring of one nucleus mask as [x, y] pixel centres, or None for an empty mask."""
    # A zero border keeps findContours from treating pixels on the crop edge specially.
    padded = np.pad(nucleus.astype(np.uint8), 1)
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None

    # A 4-connected nucleus has one outer contour; a nucleus in pieces keeps its largest piece.
    contour = max(contours, key=cv2.contourArea).reshape(-1, 2) - 1
    ring = contour.tolist()
    ring.append(ring[0])
    return ring


def nucleus_features(
    instances: np.ndarray, class_mask: np.ndarray, class_map: ClassMap, min_area: int = MIN_NUCLEUS_AREA_PX
) -> list[dict]:
    """Return one QuPath Polygon feature per nucleus of ``instances``, classed by ``class_mask``.

    ``instances`` is an H x W int instance map (0 background); ``class_mask``
    contains 0 for background and class index + 1, constant over each nucleus.
    Components smaller than ``min_area`` pixels, and those whose outline has
    fewer than 3 distinct points, are left out: a GeoJSON ring needs at least
    4 positions and a non-zero area.
    """
    if class_mask.size and int(class_mask.max()) > class_map.num_classes:
        raise UserError(
            f"class mask contains value {int(class_mask.max())}, but class map {class_map.path} has only "
            f"{class_map.num_classes} classes; use the class map the model was trained with"
        )
    features = []
    skipped = 0

    # find_objects gives each component's bounding box, so no step scans the whole region per nucleus.
    for position, box in enumerate(ndimage.find_objects(instances)):
        if box is None:
            continue
        local = instances[box] == position + 1
        values = class_mask[box][local]
        if not values.size or values[0] == 0:
            continue
        if values.size < min_area:
            skipped += 1
            continue
        ring = _outline(local)
        if ring is None or len({tuple(point) for point in ring}) < 3:
            skipped += 1
            continue
        top, left = box[0].start, box[1].start
        ring = [[int(x + left), int(y + top)] for x, y in ring]

        nucleus_class = class_map.classes[int(values[0]) - 1]
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": OBJECT_TYPE,
                    "classification": {"name": nucleus_class.name, "color": list(nucleus_class.color)},
                    "area_px": int(np.count_nonzero(local)),
                },
            }
        )
    if skipped:
        logger.info("left %d components smaller than %d px or without an area out of the GeoJSON", skipped, min_area)
    return features


def write_geojson(path: Path, instances: np.ndarray, class_mask: np.ndarray, class_map: ClassMap) -> int:
    """Write the nuclei of ``instances`` to ``path`` as a FeatureCollection; return the number of features."""
    features = nucleus_features(instances, class_mask, class_map)
    collection = {"type": "FeatureCollection", "features": features}
    try:
        Path(path).write_text(json.dumps(collection), encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path} ({error}); check that the output folder is writable") from error
    logger.debug("wrote %d nuclei to %s", len(features), path)
    return len(features)
