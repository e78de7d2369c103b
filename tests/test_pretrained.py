"""Pretrained-weight lookup in local caches, with weight files the tests write themselves."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from granularity.errors import UserError
from granularity.models.classifiers import CLASSIFIERS, build_classifier, classifier_spec


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """Return the state dict of a fresh 1000-class model, standing in for the published ImageNet weights."""
    torch.manual_seed(1)
    return CLASSIFIERS[name].build(1000).state_dict()


def _assert_backbone_loaded(model, state, head):
    for key, value in model.state_dict().items():
        if key.startswith(head + "."):
            assert value.shape[0] == 3, key
        else:
            assert torch.equal(value, state[key]), key


def test_imagenet_from_torch_hub_cache(empty_caches):
    state = _imagenet_state("resnet18")
    checkpoints = empty_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")

    model = build_classifier("resnet18", 3, "imagenet")

    _assert_backbone_loaded(model, state, "fc")
    assert model.fc.out_features == 3


def test_imagenet_from_hugging_face_cache(empty_caches):
    state = _imagenet_state("mobilenet")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf" / "models--timm--mobilenetv1_100.ra4_e3600_r224_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(snapshot / "model.safetensors"))

    model = build_classifier("mobilenet", 3, "imagenet")

    _assert_backbone_loaded(model, state, "classifier")


def test_imagenet_missing_fails_fast_offline(empty_caches):
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        build_classifier("vgg16", 3, "imagenet")
    elapsed = time.monotonic() - started

    message = str(error.value)
    assert str(empty_caches / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--pretrained none" in message
    # Generous bound: a network attempt would hang for far longer.
    assert elapsed < 30


def test_imagenet_missing_names_hugging_face_repo(empty_caches):
    with pytest.raises(UserError, match="timm/mobilenetv1_100"):
        build_classifier("mobilenet", 3, "imagenet")


def test_weight_file_path_loads_backbone(empty_caches):
    state = _imagenet_state("mobilenet_v2")
    path = empty_caches / "weights.pt"
    torch.save({"model": state}, path)

    model = build_classifier("mobilenet_v2", 3, str(path))

    _assert_backbone_loaded(model, state, "classifier.1")


def test_weight_file_with_same_head_keeps_head(empty_caches):
    torch.manual_seed(2)
    state = CLASSIFIERS["resnet18"].build(3).state_dict()
    path = empty_caches / "fine_tuned.pt"
    torch.save(state, path)

    model = build_classifier("resnet18", 3, str(path))

    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_weight_file_of_other_architecture_rejected(empty_caches):
    path = empty_caches / "resnet.pt"
    torch.save(_imagenet_state("resnet18"), path)

    with pytest.raises(UserError, match="does not fit"):
        build_classifier("mobilenet_v2", 3, str(path))


def test_missing_weight_file_named(empty_caches):
    with pytest.raises(UserError, match="nowhere.pt"):
        build_classifier("resnet18", 3, str(empty_caches / "nowhere.pt"))


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match="resnet18, vgg16, mobilenet, mobilenet_v2"):
        classifier_spec("alexnet")
