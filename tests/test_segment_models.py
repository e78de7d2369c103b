"""Segmenter factory: architectures, encoder names and pretrained weights."""

from __future__ import annotations

import pytest
import torch

from granularity.errors import ConfigError, UserError
from granularity.models.segmenters import build_segmenter


@pytest.mark.parametrize("model", ["unet", "fpn", "linknet"])
def test_build_segmenter_output_shape(model):
    segmenter = build_segmenter(model, "resnet18", num_classes=5, pretrained="none").eval()
    with torch.no_grad():
        output = segmenter(torch.zeros(1, 3, 64, 96))
    assert output.shape == (1, 5, 64, 96)


def test_unknown_encoder_lists_close_matches():
    with pytest.raises(ConfigError, match="close matches: .*resnet18"):
        build_segmenter("unet", "resnet81", num_classes=3, pretrained="none")


def test_unknown_model_raises():
    with pytest.raises(ConfigError, match="unet, fpn, linknet"):
        build_segmenter("deeplab", "resnet18", num_classes=3, pretrained="none")


def test_imagenet_weights_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="--pretrained none"):
        build_segmenter("unet", "resnet18", num_classes=3, pretrained="imagenet")


def test_encoder_weights_from_file(tmp_path):
    source = build_segmenter("linknet", "resnet18", num_classes=3, pretrained="none")
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)

    loaded = build_segmenter("fpn", "resnet18", num_classes=4, pretrained=str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key


def test_whole_segmenter_weights_from_file(tmp_path):
    source = build_segmenter("unet", "resnet18", num_classes=3, pretrained="none")
    path = tmp_path / "unet.pt"
    torch.save(source.state_dict(), path)

    loaded = build_segmenter("unet", "resnet18", num_classes=3, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_of_other_encoder_raise(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError, match="does not fit encoder resnet18"):
        build_segmenter("unet", "resnet18", num_classes=3, pretrained=str(path))


def test_missing_weight_file_raises(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_segmenter("unet", "resnet18", num_classes=3, pretrained=str(tmp_path / "absent.pt"))
