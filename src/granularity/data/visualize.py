"""Class masks drawn in class colours, for figures and overlays."""

from __future__ import annotations

import numpy as np

from granularity.data.class_map import ClassMap

BACKGROUND_COLOR = (0, 0, 0)


def colorize(class_mask: np.ndarray, class_map: ClassMap) -> np.ndarray:
    """Return an H x W x 3 uint8 picture of a class mask (0 background, class index + 1 per class)."""
    palette = np.array([BACKGROUND_COLOR] + [c.color for c in class_map.classes], dtype=np.uint8)
    return palette[np.clip(class_mask, 0, len(palette) - 1)]


def overlay(image: np.ndarray, class_mask: np.ndarray, class_map: ClassMap, alpha: float = 0.45) -> np.ndarray:
    """Return the image with nucleus pixels blended towards their class colour."""
    colours = colorize(class_mask, class_map).astype(np.float32)
    blended = image.astype(np.float32)
    foreground = class_mask > 0
    blended[foreground] = (1 - alpha) * blended[foreground] + alpha * colours[foreground]
    return blended.round().astype(np.uint8)


def annotation_figure(image: np.ndarray, class_masks: dict[str, np.ndarray], class_map: ClassMap, title: str = ""):
    """Return a matplotlib figure: the image, then one panel per granularity's class mask, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = {"pw": "pixel-wise (pw)", "el": "ellipse (el)", "bd": "bounding box (bd)"}
    figure, axes = plt.subplots(1, 1 + len(class_masks), figsize=(3.2 * (1 + len(class_masks)), 3.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    for axis, (granularity, mask) in zip(axes[1:], class_masks.items()):
        axis.imshow(colorize(mask, class_map))
        axis.set_title(labels.get(granularity, granularity))
    for axis in axes:
        axis.set_axis_off()
    handles = [Patch(facecolor=np.array(c.color) / 255, edgecolor="grey", label=c.name) for c in class_map.classes]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08, 1, 0.95))
    return figure
