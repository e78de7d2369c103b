"""Augmentation: the 8 dihedral variants and colour jitter.

The dihedral variants (rotations by 0, 90, 180 and 270 degrees, each with and
without a mirror) move whole pixels, so masks keep their exact values.
Colour jitter touches the image only. Its ranges are the maximum deltas of
Liu et al. 2017, "Detecting cancer metastases on gigapixel pathology
images": brightness 64/255, saturation 0.25, hue 0.04 and contrast 0.75,
applied in that order. Saturation and contrast are read as deviations of a
scale factor from 1, and hue as a fraction of the hue circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NUM_DIHEDRAL = 8


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Return dihedral variant ``k`` (0..7) of an H x W or H x W x C array.

    Variants 0..3 rotate by k * 90 degrees counter-clockwise; 4..7 mirror
    left-right first and then rotate by (k - 4) * 90 degrees. Variant 0 is
    the input. The result is a contiguous copy.
    """
    if not 0 <= int(k) < NUM_DIHEDRAL:
        raise ValueError(f"dihedral variant {k} is invalid; use 0..7")
    if array.ndim not in (2, 3):
        raise ValueError(f"array of shape {array.shape} is neither H x W nor H x W x C")
    out = np.flip(array, axis=1) if k >= 4 else array
    return np.ascontiguousarray(np.rot90(out, k % 4, axes=(0, 1)))


@dataclass(frozen=True)
class ColourJitter:
    """Ranges of the colour jitter; the defaults are those of Liu et al. 2017.

    Attributes:
        brightness: maximum delta added to every channel, on a 0..1 scale.
        contrast: maximum deviation of the contrast factor from 1.
        saturation: maximum deviation of the saturation factor from 1.
        hue: maximum hue shift, as a fraction of the hue circle.
    """

    brightness: float = 64.0 / 255.0
    contrast: float = 0.75
    saturation: float = 0.25
    hue: float = 0.04

    def sample(self, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """Draw (brightness delta, contrast factor, saturation factor, hue delta) uniformly."""
        return (
            float(rng.uniform(-self.brightness, self.brightness)),
            float(rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)),
            float(rng.uniform(1.0 - self.saturation, 1.0 + self.saturation)),
            float(rng.uniform(-self.hue, self.hue)),
        )


def adjust_colour(image: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float) -> np.ndarray:
    """Apply fixed colour changes to an H x W x 3 uint8 RGB image and return a new uint8 image.

    Steps, each clipped to 0..1:

    1. add ``brightness`` to every channel;
    2. scale the saturation by ``saturation``;
    3. rotate the hue by ``hue`` of the circle;
    4. scale every channel's deviation from its own mean by ``contrast``.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image of shape {image.shape} is not H x W x 3 RGB")
    pixels = image.astype(np.float32) / 255.0
    pixels = np.clip(pixels + brightness, 0.0, 1.0)

    # OpenCV's float HSV: hue in degrees 0..360, saturation and value in 0..1.
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue * 360.0, 360.0)
    pixels = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)

    mean = pixels.mean(axis=(0, 1), keepdims=True)
    pixels = np.clip((pixels - mean) * contrast + mean, 0.0, 1.0)
    return np.rint(pixels * 255.0).astype(np.uint8)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, jitter: ColourJitter = ColourJitter()) -> np.ndarray:
    """Apply one random colour jitter drawn from ``jitter`` to an RGB uint8 image."""
    return adjust_colour(image, *jitter.sample(rng))


class StudyAugmentation:
    """Random training transform: one dihedral variant for image and masks, colour jitter for the image.

    Calling it with ``(image, *masks)`` applies the same dihedral variant to
    the image and every mask, and with probability ``jitter_probability``
    a colour jitter to the image. It returns the image alone when no mask is
    given, else the tuple ``(image, *masks)``. Masks are only moved, never
    interpolated, so their values and histogram stay the same.
    """

    def __init__(self, seed: int = 0, jitter_probability: float = 0.5, jitter: ColourJitter = ColourJitter()):
        if not 0.0 <= jitter_probability <= 1.0:
            raise ValueError(f"jitter probability {jitter_probability} is outside 0..1")
        self.rng = np.random.default_rng(seed)
        self.jitter_probability = jitter_probability
        self.jitter = jitter

    def __call__(self, image: np.ndarray, *masks: np.ndarray):
        for mask in masks:
            if mask.shape[:2] != image.shape[:2]:
                raise ValueError(f"mask of shape {mask.shape} does not match image of shape {image.shape}")
        k = int(self.rng.integers(NUM_DIHEDRAL))
        out = dihedral(image, k)
        if self.rng.random() < self.jitter_probability:
            out = colour_jitter(out, self.rng, self.jitter)
        if not masks:
            return out
        return (out,) + tuple(dihedral(mask, k) for mask in masks)


def expand_study(image: np.ndarray, seed: int = 0, jitter: ColourJitter = ColourJitter()) -> list[np.ndarray]:
    """Return the 16 patches the original study made from one: 8 dihedral variants, then each of them jittered.

    Items 0..7 are ``dihedral(image, k)``; item 8 + k is variant k with a
    random colour jitter drawn from ``seed``.
    """
    rng = np.random.default_rng(seed)
    variants = [dihedral(image, k) for k in range(NUM_DIHEDRAL)]
    return variants + [colour_jitter(variant, rng, jitter) for variant in variants]
