"""Patch datasets for classification: windows cut from region images, optionally expanded into variants, resized."""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

# (patch, variant index) -> augmented patch, same shape; variant 0 must return the patch unchanged.
VariantFunction = Callable[[np.ndarray, int], np.ndarray]


class PatchDataset(Dataset):
    """The windows of ``table`` as normalised C x H x W float tensors with their class index.

    Item ``i`` is variant ``i % variants`` of window ``i // variants``, so an
    expansion into ``variants`` patches per window (the study's 16) keeps
    every variant of one window in one subset. Each window is cut from its
    region image, passed through ``variant_function`` and then resized to
    ``input_size`` x ``input_size`` with bilinear interpolation.

    Args:
        images: region images (H x W x 3 uint8 RGB), indexed by the table's ``region``.
        table: windows with columns ``region``, ``x``, ``y``, ``size`` and ``label``.
        input_size: side of the tensors the model receives.
        mean, std: per-channel normalisation of RGB values scaled to [0, 1].
        variants: patches per window; 1 without augmentation.
        variant_function: makes variant ``k`` of a patch; required when ``variants`` > 1.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        table: pd.DataFrame,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        variants: int = 1,
        variant_function: VariantFunction | None = None,
    ):
        if variants > 1 and variant_function is None:
            raise ValueError("variant_function is required when variants > 1")
        self.images = images
        self.regions = table["region"].to_numpy(dtype=np.int64)
        self.xs = table["x"].to_numpy(dtype=np.int64)
        self.ys = table["y"].to_numpy(dtype=np.int64)
        self.sizes = table["size"].to_numpy(dtype=np.int64)
        self.labels = table["label"].to_numpy(dtype=np.int64)
        self.input_size = int(input_size)
        self.variants = int(variants)
        self.variant_function = variant_function

        # Normalising in uint8 units saves one full-size multiplication per patch.
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.scale = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)

    def __len__(self) -> int:
        return len(self.labels) * self.variants

    def window_patch(self, window: int) -> np.ndarray:
        """Return window ``window`` cut from its region image, before augmentation and resizing."""
        image = self.images[self.regions[window]]
        x, y, size = self.xs[window], self.ys[window], self.sizes[window]
        return image[y : y + size, x : x + size]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window, variant = divmod(int(index), self.variants)
        patch = self.window_patch(window)
        if variant and self.variant_function is not None:
            patch = self.variant_function(patch, variant)

        if patch.shape[0] != self.input_size or patch.shape[1] != self.input_size:
            patch = cv2.resize(np.ascontiguousarray(patch), (self.input_size, self.input_size), interpolation=cv2.INTER_LINEAR)

        normalised = (patch.astype(np.float32) - self.mean) * self.scale
        tensor = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))
        return tensor, torch.tensor(self.labels[window])
