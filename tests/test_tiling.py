"""Padding to the model stride, cropping back and sliding-window prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from granularity.errors import ConfigError, DatasetError
from granularity.models.segmenters import build_segmenter
from granularity.models.tiling import (
    crop,
    image_to_tensor,
    pad_image,
    pad_mask,
    pad_to_multiple,
    padded_size,
    predict_class_mask,
    predict_probabilities,
    window_starts,
)


class PixelwiseModel(nn.Module):
    """A 1 x 1 convolution: its output at a pixel depends on that pixel only, so tiling must not change it."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, kernel_size=1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0, x.shape
        self.shapes.append(tuple(x.shape))
        return self.conv(x)


class WindowMeanModel(nn.Module):
    """Logits constant over each window: class 1 gets the window's mean of input channel 0."""

    def forward(self, x):
        logits = torch.zeros((x.shape[0], 2, x.shape[2], x.shape[3]))
        logits[:, 1] = x[:, 0].mean(dim=(1, 2)).view(-1, 1, 1)
        return logits


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("size", "expected"), [(1, 32), (31, 32), (32, 32), (33, 64), (250, 256), (256, 256)])
def test_padded_size(size, expected):
    assert padded_size(size) == expected


def test_pad_image_reflects_and_crops_back():
    image = _image(250, 37)
    padded, size = pad_to_multiple(image)
    assert padded.shape == (256, 64, 3)
    assert size == (250, 37)
    # Reflection mirrors around the last row without repeating it.
    np.testing.assert_array_equal(padded[250, :37], image[248])
    np.testing.assert_array_equal(padded[:250, 37], image[:, 35])
    np.testing.assert_array_equal(crop(padded, size), image)


def test_pad_mask_is_constant():
    mask = np.random.default_rng(1).integers(0, 4, size=(33, 20)).astype(np.uint8)
    padded = pad_mask(mask, 64, 32, fill=255)
    assert padded.shape == (64, 32)
    np.testing.assert_array_equal(padded[:33, :20], mask)
    assert np.all(padded[33:] == 255)
    assert np.all(padded[:, 20:] == 255)
    assert set(np.unique(padded)) <= set(np.unique(mask)) | {255}


def test_pad_image_of_one_pixel():
    image = _image(1, 1)
    padded = pad_image(image, 32, 32)
    assert np.all(padded == image[0, 0])


def test_empty_region_raises():
    with pytest.raises(DatasetError, match="empty"):
        pad_to_multiple(np.zeros((0, 10, 3), dtype=np.uint8))


@pytest.mark.parametrize(("length", "window", "stride", "expected"), [(256, 256, 192, [0]), (100, 256, 192, [0]), (512, 256, 192, [0, 192, 256]), (448, 256, 128, [0, 128, 192])])
def test_window_starts(length, window, stride, expected):
    assert window_starts(length, window, stride) == expected


@pytest.mark.parametrize("shape", [(250, 250), (33, 97), (300, 70), (17, 5)])
def test_sliding_window_equals_whole_image_for_pixelwise_model(shape):
    model = PixelwiseModel()
    image = _image(*shape)
    tiled = predict_probabilities(model, image, tile_size=64, overlap=16, batch_size=4)

    expected = torch.softmax(model.conv(image_to_tensor(image).unsqueeze(0)), dim=1)[0]
    assert tiled.shape == (3, *shape)
    torch.testing.assert_close(tiled, expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(tiled.sum(dim=0), torch.ones(shape))


def test_windows_cut_large_regions():
    model = PixelwiseModel()
    predict_probabilities(model, _image(250, 250), tile_size=128, overlap=32, batch_size=2)
    # 256 padded, windows of 128 at 0, 96, 128 per axis: 9 windows in batches of 2.
    assert sum(shape[0] for shape in model.shapes) == 9
    assert all(shape[-2:] == (128, 128) for shape in model.shapes)


def test_small_region_is_one_forward_pass():
    model = PixelwiseModel()
    predict_probabilities(model, _image(250, 250), tile_size=256)
    assert model.shapes == [(1, 3, 256, 256)]


def test_overlap_averages_softmax():
    image = _image(64, 96, seed=3)
    probabilities = predict_probabilities(WindowMeanModel(), image, tile_size=64, overlap=32)

    tensor = image_to_tensor(pad_to_multiple(image)[0])
    left = torch.sigmoid(tensor[0, :, 0:64].mean())
    right = torch.sigmoid(tensor[0, :, 32:96].mean())
    torch.testing.assert_close(probabilities[1, :, :32], torch.full((64, 32), float(left)))
    torch.testing.assert_close(probabilities[1, :, 64:], torch.full((64, 32), float(right)))
    torch.testing.assert_close(probabilities[1, :, 32:64], torch.full((64, 32), float((left + right) / 2)))


def test_unet_on_250_pixels():
    model = build_segmenter("unet", "resnet18", num_classes=3, pretrained="none")
    mask = predict_class_mask(model, _image(250, 250), tile_size=128, overlap=32)
    assert mask.shape == (250, 250)
    assert mask.dtype == np.uint8
    assert mask.max() <= 2


@pytest.mark.parametrize("tile_size", [0, 100, 16])
def test_invalid_tile_size_raises(tile_size):
    with pytest.raises(ConfigError, match="tile_size"):
        predict_probabilities(PixelwiseModel(), _image(40, 40), tile_size=tile_size)


def test_model_mode_is_restored():
    model = PixelwiseModel()
    model.train()
    predict_probabilities(model, _image(40, 40), tile_size=64)
    assert model.training
