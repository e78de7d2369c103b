"""Regions of any size through a segmenter: padding to its stride and overlapping sliding windows.

Images are padded by reflection so the border looks like tissue; masks are
padded with a constant (background or an ignore value), never interpolated.
Padding is added at the bottom and right, so cropping back is a slice.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from granularity.errors import ConfigError, DatasetError
from granularity.models.segmenters import OUTPUT_STRIDE

logger = logging.getLogger(__name__)

# Mask value that the training loss skips: the pixels added by padding.
IGNORE_INDEX = 255


def padded_size(size: int, multiple: int = OUTPUT_STRIDE) -> int:
    """Return the smallest multiple of ``multiple`` that is at least ``size`` (and at least one multiple)."""
    return max(multiple, math.ceil(size / multiple) * multiple)


def pad_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an H x W (x C) image by reflection at the bottom and right to ``height`` x ``width``."""
    _check_region_shape(image.shape[:2], "image")
    pad = ((0, height - image.shape[0]), (0, width - image.shape[1])) + ((0, 0),) * (image.ndim - 2)
    if any(after < 0 for _, after in pad):
        raise ValueError(f"cannot pad an image of {image.shape[:2]} down to {(height, width)}")
    return np.pad(image, pad, mode="reflect")


def pad_mask(mask: np.ndarray, height: int, width: int, fill: int = 0) -> np.ndarray:
    """Pad an H x W mask with the constant ``fill`` at the bottom and right to ``height`` x ``width``."""
    _check_region_shape(mask.shape[:2], "mask")
    pad = ((0, height - mask.shape[0]), (0, width - mask.shape[1]))
    if any(after < 0 for _, after in pad):
        raise ValueError(f"cannot pad a mask of {mask.shape} down to {(height, width)}")
    return np.pad(mask, pad, mode="constant", constant_values=fill)


def pad_to_multiple(image: np.ndarray, multiple: int = OUTPUT_STRIDE) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad an image to a multiple of ``multiple`` on both sides; return it with the original H, W for ``crop``."""
    height, width = image.shape[:2]
    return pad_image(image, padded_size(height, multiple), padded_size(width, multiple)), (height, width)


def crop(array: np.ndarray | torch.Tensor, size: tuple[int, int]):
    """Crop the last two axes (tensors, C x H x W) or the first two (arrays, H x W [x C]) back to ``size``."""
    height, width = size
    if isinstance(array, torch.Tensor):
        return array[..., :height, :width]
    return array[:height, :width]


def _check_region_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
        raise DatasetError(f"{what} of shape {tuple(shape)} is empty; a region needs at least 1 x 1 pixels")


def check_tile_size(tile_size: int) -> None:
    """Raise a ConfigError unless ``tile_size`` is a positive multiple of the model stride."""
    if tile_size < OUTPUT_STRIDE or tile_size % OUTPUT_STRIDE:
        raise ConfigError(
            f"tile_size {tile_size} is invalid; use a multiple of {OUTPUT_STRIDE} pixels (e.g. 256), or 0 for whole regions"
        )


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Return window offsets along one axis of ``length`` that cover it, the last window flush with the end."""
    if window >= length:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Return a 3 x H x W float tensor of an H x W x 3 uint8 image, scaled to [0, 1] and ImageNet-normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (tensor - mean) / std


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile_size: int = 256,
    overlap: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> torch.Tensor:
    """Predict C x H x W class probabilities of an H x W x 3 uint8 image of any size.

    The image is padded to a multiple of 32. A padded image no larger than
    ``tile_size`` on either side goes through the model in one forward pass;
    a larger one is cut into ``tile_size`` windows that overlap by ``overlap``
    pixels (a quarter of the tile by default), and the softmax of overlapping
    windows is averaged. The result is
    cropped back to H x W and lies on the CPU.
    """
    check_tile_size(tile_size)
    overlap = tile_size // 4 if overlap is None else overlap
    if not 0 <= overlap < tile_size:
        raise ConfigError(f"overlap {overlap} is invalid; use 0 <= overlap < tile_size ({tile_size})")
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"image of shape {image.shape} is not H x W x 3 RGB")

    device = torch.device(device)
    padded, size = pad_to_multiple(image)
    height, width = padded.shape[:2]
    tensor = image_to_tensor(padded)
    window_height, window_width = min(tile_size, height), min(tile_size, width)
    stride = tile_size - overlap
    boxes = [(y, x) for y in window_starts(height, window_height, stride) for x in window_starts(width, window_width, stride)]

    was_training = model.training
    model.eval()
    summed = None
    coverage = torch.zeros((1, height, width))
    try:
        for first in range(0, len(boxes), batch_size):
            batch_boxes = boxes[first : first + batch_size]
            batch = torch.stack([tensor[:, y : y + window_height, x : x + window_width] for y, x in batch_boxes])
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
                logits = model(batch)
            probabilities = torch.softmax(logits.float(), dim=1).cpu()
            if summed is None:
                summed = torch.zeros((probabilities.shape[1], height, width))
            for (y, x), window in zip(batch_boxes, probabilities):
                summed[:, y : y + window_height, x : x + window_width] += window
                coverage[:, y : y + window_height, x : x + window_width] += 1
    finally:
        model.train(was_training)
    return crop(summed / coverage, size)


def predict_class_mask(model: nn.Module, image: np.ndarray, **options) -> np.ndarray:
    """Return the H x W uint8 class mask (0 background, class index + 1) of an image of any size."""
    probabilities = predict_probabilities(model, image, **options)
    return probabilities.argmax(dim=0).numpy().astype(np.uint8)
