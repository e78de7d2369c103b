"""Plain reference for preparing patches: full-image masks and Python loops, no shortcuts.

It follows the same rules as ``granularity.data.granularity`` and
``granularity.data.patches`` but checks every nucleus against every window
with whole-region pixel masks, the way one would write it first. The
benchmark times it against the package and compares the window labels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from granularity.data.granularity import FIT_RNG_SEED
from granularity.data.region import Region


def nucleus_shapes(region: Region) -> list[dict]:
    """Return, per nucleus in id order, its class and its pw, el and bd masks over the whole region.

    Each entry also records whether the nucleus touches the region edge
    (``cut``) and whether the edge clipped its ellipse (``el_clipped``).
    """
    instances = region.instances
    height, width = instances.shape
    ys_all, xs_all = np.mgrid[0:height, 0:width]
    shapes = []
    for nucleus_id in sorted(int(i) for i in np.unique(instances) if i != 0):
        mask = instances == nucleus_id
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        box_w, box_h = x1 - x0 + 1, y1 - y0 + 1

        box = np.zeros_like(mask)
        box[y0 : y1 + 1, x0 : x1 + 1] = True

        # Ellipse: fit to every external contour point, else the one inscribed in the box.
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        points = np.concatenate(contours)
        inscribed = (x0 + (box_w - 1) / 2, y0 + (box_h - 1) / 2, box_w - 1, box_h - 1, 0.0)
        if len(points) < 5:
            cx, cy, ew, eh, angle = inscribed
        else:
            # The same seed as the package: OpenCV jitters nearly collinear points with its global RNG.
            cv2.setRNGSeed(FIT_RNG_SEED)
            (cx, cy), (ew, eh), angle = cv2.fitEllipse(points)
            values = [cx, cy, ew, eh]
            if not all(math.isfinite(v) for v in values) or min(ew, eh) < 0.1 or max(ew, eh) > math.hypot(box_w, box_h) + 2:
                cx, cy, ew, eh, angle = inscribed

        def inside(xx, yy):
            t = math.radians(angle)
            u = ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)) / (ew / 2 + 0.5)
            v = ((yy - cy) * math.cos(t) - (xx - cx) * math.sin(t)) / (eh / 2 + 0.5)
            return u * u + v * v <= 1.0

        ellipse = inside(xs_all, ys_all)
        if not ellipse.any():
            cx, cy, ew, eh, angle = inscribed
            ellipse = inside(xs_all, ys_all)

        # Clipped: some pixel centre just outside the region lies inside the ellipse.
        reach = int(math.ceil(max(ew, eh) / 2 + 1))
        yy, xx = np.mgrid[-reach : height + reach, -reach : width + reach]
        outside = (xx < 0) | (xx >= width) | (yy < 0) | (yy >= height)
        el_clipped = bool((inside(xx, yy) & outside).any())

        shapes.append(
            {
                "class": region.classes[nucleus_id],
                "pw": mask,
                "el": ellipse,
                "bd": box,
                "cut": x0 == 0 or y0 == 0 or x1 == width - 1 or y1 == height - 1,
                "el_clipped": el_clipped,
            }
        )
    return shapes


def reference_windows(
    shapes: list[dict], shape: tuple[int, int], granularity: str, patch_size: int, stride: int, severities: list[int]
) -> list[tuple[int, int, int]]:
    """Return (x, y, label) of every kept window, checking each nucleus against each window."""
    height, width = shape
    kept = []
    for y in range(0, height - patch_size + 1, stride):
        for x in range(0, width - patch_size + 1, stride):
            label = None
            complete = False
            for nucleus in shapes:
                mask = nucleus[granularity]
                window = mask[y : y + patch_size, x : x + patch_size]
                if not window.any():
                    continue
                class_index = nucleus["class"]
                if label is None or severities[class_index] > severities[label] or (
                    severities[class_index] == severities[label] and class_index < label
                ):
                    label = class_index
                clipped = nucleus["cut"] or (granularity == "el" and nucleus["el_clipped"])
                if not clipped and window.sum() == mask.sum():
                    complete = True
            if complete:
                kept.append((x, y, label))
    return kept


def prepare_region(region: Region, severities: list[int], patch_sizes, granularities) -> dict[tuple[int, str], list[tuple[int, int, int]]]:
    """Return (patch_size, granularity) -> kept windows of one region."""
    shapes = nucleus_shapes(region)
    return {
        (size, granularity): reference_windows(shapes, region.shape, granularity, size, size // 2, severities)
        for size in patch_sizes
        for granularity in granularities
    }
