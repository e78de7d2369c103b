"""Patch classifiers: ResNet18, VGG16 and MobileNet v2 from torchvision, MobileNet v1 from timm."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from torch import nn

from granularity.errors import ConfigError
from granularity.models.pretrained import WeightSource, load_weights_with_new_head, read_state_dict, resolve_pretrained

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


def _vgg16(num_classes: int) -> nn.Module:
    from torchvision.models import vgg16

    return vgg16(weights=None, num_classes=num_classes)


def _mobilenet_v2(num_classes: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=num_classes)


def _mobilenet_v1(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("mobilenetv1_100", pretrained=False, num_classes=num_classes)


@dataclass(frozen=True)
class ClassifierSpec:
    """One architecture: how to build it, where its head sits, its weights and input normalisation.

    Attributes:
        build: returns the model with a freshly initialised head of ``num_classes`` outputs.
        head: module path of the final linear layer.
        weights: where its ImageNet weights live in the local caches.
        mean, std: per-channel normalisation of RGB values in [0, 1] that the weights were trained with.
    """

    build: Callable[[int], nn.Module]
    head: str
    weights: WeightSource
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


CLASSIFIERS: dict[str, ClassifierSpec] = {
    "resnet18": ClassifierSpec(
        build=_resnet18,
        head="fc",
        weights=WeightSource(
            hub_file="resnet18-f37072fd.pth",
            download_hint="python -c 'import torchvision; torchvision.models.resnet18(weights=\"IMAGENET1K_V1\")'",
        ),
    ),
    "vgg16": ClassifierSpec(
        build=_vgg16,
        head="classifier.6",
        weights=WeightSource(
            hub_file="vgg16-397923af.pth",
            download_hint="python -c 'import torchvision; torchvision.models.vgg16(weights=\"IMAGENET1K_V1\")'",
        ),
    ),
    "mobilenet": ClassifierSpec(
        build=_mobilenet_v1,
        head="classifier",
        weights=WeightSource(
            hf_repo="timm/mobilenetv1_100.ra4_e3600_r224_in1k",
            download_hint="python -c 'import timm; timm.create_model(\"mobilenetv1_100\", pretrained=True)'",
        ),
        # timm trained this MobileNet v1 on inputs scaled to [-1, 1].
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    "mobilenet_v2": ClassifierSpec(
        build=_mobilenet_v2,
        head="classifier.1",
        weights=WeightSource(
            hub_file="mobilenet_v2-b0353104.pth",
            download_hint="python -c 'import torchvision; torchvision.models.mobilenet_v2(weights=\"IMAGENET1K_V1\")'",
        ),
    ),
}


def classifier_spec(name: str) -> ClassifierSpec:
    """Return the spec of model ``name``; raise ConfigError listing the valid names otherwise."""
    key = str(name).strip().lower()
    if key not in CLASSIFIERS:
        raise ConfigError(f"unknown model {name!r}; valid classifiers are {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[key]


def build_classifier(name: str, num_classes: int, pretrained: str | None = "none") -> nn.Module:
    """Build classifier ``name`` with a head of ``num_classes`` outputs, loading ``pretrained`` weights.

    ``pretrained`` is ``imagenet`` (local caches only), ``none`` or a weight
    file path. The loaded weights fill everything but the head, which is new
    unless the file contains a head of ``num_classes`` outputs.
    """
    spec = classifier_spec(name)
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, the class map has {num_classes}; add classes to the class map")

    # Look the weights up first: building VGG16 takes seconds, and a missing file should fail at once.
    weights_path = resolve_pretrained(pretrained, name, spec.weights)
    model = spec.build(num_classes)
    if weights_path is None:
        logger.info("built %s with %d classes and random weights", name, num_classes)
        return model

    state = read_state_dict(weights_path)
    head_loaded = load_weights_with_new_head(model, state, spec.head, weights_path)
    logger.info(
        "built %s with %d classes from %s (%s)",
        name,
        num_classes,
        weights_path,
        "head loaded too" if head_loaded else f"new {spec.head} head",
    )
    return model
