"""Image decoding: RGB region images and single-channel label images from PNG, JPEG and TIFF."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import tifffile

from granularity.errors import DatasetError

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")

# Byte 25 of a PNG file is the colour type of its IHDR chunk; 3 means palette.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE_OFFSET = 25
_PNG_PALETTE = 3


def _decode(path: Path) -> np.ndarray:
    """Decode a file with its channels as stored (BGR order for cv2, RGB for TIFF)."""
    if not path.is_file():
        raise DatasetError(f"image {path} not found; check the dataset folder or restore the file")
    if path.stat().st_size == 0:
        raise DatasetError(f"image {path} is empty (0 bytes); replace it with a valid image file")

    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            return tifffile.imread(path)
        except Exception as error:  # tifffile raises several exception types for broken files
            raise DatasetError(f"image {path} could not be decoded ({error}); replace the corrupt file") from error

    # IMREAD_UNCHANGED keeps 16-bit depth and alpha, and ignores EXIF orientation,
    # so pixels stay aligned with annotations drawn on the stored raster.
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DatasetError(f"image {path} could not be decoded; replace the corrupt file or convert it to PNG")
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
    return pixels


def _is_palette_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        header = handle.read(_PNG_COLOR_TYPE_OFFSET + 1)
    return (
        header.startswith(_PNG_SIGNATURE)
        and len(header) > _PNG_COLOR_TYPE_OFFSET
        and header[_PNG_COLOR_TYPE_OFFSET] == _PNG_PALETTE
    )


def _channels_last(pixels: np.ndarray) -> np.ndarray:
    # Planar TIFFs store channels first (3 x H x W).
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[2] not in (3, 4):
        return np.moveaxis(pixels, 0, -1)
    return pixels


def _to_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        # A fixed full-range scale keeps colours comparable between images of one
        # dataset, which a per-image min-max stretch would not.
        logger.warning("image %s: converted 16-bit pixels to 8-bit (value / 257)", path)
        return np.round(pixels / 257.0).astype(np.uint8)
    if pixels.dtype == np.bool_:
        logger.warning("image %s: converted a binary image to 8-bit (0 / 255)", path)
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.floating):
        finite = pixels[np.isfinite(pixels)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        logger.warning("image %s: converted floating-point pixels to 8-bit (x %g, clipped to 0-255)", path, scale)
        return np.clip(np.nan_to_num(pixels) * scale, 0, 255).round().astype(np.uint8)
    raise DatasetError(
        f"image {path} has pixel type {pixels.dtype}, which is not an image format this reader converts; "
        "save it as 8-bit or 16-bit RGB PNG or TIFF"
    )


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as H x W x 3 uint8 RGB, converting other layouts with a logged warning.

    RGBA loses its alpha channel, greyscale is replicated into three channels,
    16-bit is scaled to 8-bit and palette PNGs are expanded. An empty, corrupt
    or missing file raises ``DatasetError``.
    """
    path = Path(path)
    pixels = _channels_last(_decode(path))

    if path.suffix.lower() == ".png" and _is_palette_png(path):
        # cv2 expands the palette while decoding, so only the warning is left to do.
        logger.warning("image %s: expanded a palette PNG to RGB", path)

    pixels = _to_uint8(pixels, path)

    if pixels.ndim == 2:
        logger.warning("image %s: replicated a greyscale image into 3 RGB channels", path)
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        logger.warning("image %s: replicated a greyscale image into 3 RGB channels", path)
        return np.repeat(pixels, 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        logger.warning("image %s: dropped the alpha channel of a greyscale image and replicated it into RGB", path)
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        logger.warning("image %s: dropped the alpha channel of an RGBA image", path)
        return np.ascontiguousarray(pixels[:, :, :3])
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    raise DatasetError(
        f"image {path} has shape {pixels.shape}, expected H x W x 3 RGB; "
        "save a single-page RGB image (a multi-page or pyramid TIFF needs to be exported as one page)"
    )


def load_label_image(path: str | Path) -> np.ndarray:
    """Read a single-channel integer label image (PNG or TIFF, 8/16/32-bit) as an H x W array."""
    path = Path(path)
    pixels = _decode(path)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim != 2:
        raise DatasetError(
            f"label image {path} has shape {pixels.shape}, expected one channel (H x W) of instance ids; "
            "save the instance map as a greyscale 16-bit PNG or 32-bit TIFF"
        )
    if not (np.issubdtype(pixels.dtype, np.integer) or pixels.dtype == np.bool_):
        if np.issubdtype(pixels.dtype, np.floating) and np.all(np.mod(pixels, 1) == 0):
            return pixels.astype(np.int64)
        raise DatasetError(
            f"label image {path} has pixel type {pixels.dtype}, expected integer instance ids; "
            "save the instance map as a 16-bit PNG or 32-bit integer TIFF"
        )
    return pixels
