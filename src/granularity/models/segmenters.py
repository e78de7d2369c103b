"""Segmenter factory: UNet, FPN and LinkNet from segmentation-models-pytorch with any of its encoders."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import segmentation_models_pytorch as smp
from torch import nn

from granularity.errors import ConfigError, UserError
from granularity.models.pretrained import WeightSource, read_state_dict, resolve_pretrained

logger = logging.getLogger(__name__)

ARCHITECTURES = {"unet": smp.Unet, "fpn": smp.FPN, "linknet": smp.Linknet}

# Five stride-2 stages in every encoder used here: inputs must be a multiple of 32 pixels.
OUTPUT_STRIDE = 32


def encoder_names() -> list[str]:
    """Return smp's own encoder names followed by the timm ones it wraps as ``tu-<timm name>``."""
    import timm

    return list(smp.encoders.get_encoder_names()) + [f"tu-{name}" for name in timm.list_models()]


def check_encoder(encoder: str) -> None:
    """Raise a ConfigError listing close matches when ``encoder`` is no smp or timm encoder."""
    if encoder in smp.encoders.get_encoder_names():
        return
    names = encoder_names()
    if encoder in names:
        return
    close = difflib.get_close_matches(encoder, names, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "see segmentation_models_pytorch.encoders.get_encoder_names()"
    raise ConfigError(f"encoder {encoder!r} does not exist in segmentation-models-pytorch; {hint}")


def _imagenet_source(encoder: str) -> WeightSource:
    """Return where the ImageNet weights of ``encoder`` live in the local caches."""
    if encoder.startswith("tu-"):
        import timm

        config = timm.models.get_pretrained_cfg(encoder[3:])
        return WeightSource(
            hf_repo=getattr(config, "hf_hub_id", None),
            download_hint=f"timm.create_model('{encoder[3:]}', pretrained=True)",
        )

    settings = smp.encoders.encoders[encoder]["pretrained_settings"].get("imagenet")
    if settings is None:
        raise ConfigError(f"encoder {encoder!r} has no ImageNet weights in segmentation-models-pytorch; pass --pretrained none or a weights file")

    # smp's ResNet encoders are torchvision ResNets without the classifier, so torchvision's file fits them too.
    hub_file = None
    if encoder.startswith("resne"):
        try:
            import torchvision

            weights = torchvision.models.get_model_weights(encoder)
            hub_file = Path(weights.IMAGENET1K_V1.url).name
        except (ValueError, AttributeError):
            hub_file = None
    return WeightSource(
        hub_file=hub_file,
        hf_repo=settings["repo_id"],
        download_hint=f"segmentation_models_pytorch.encoders.get_encoder('{encoder}', weights='imagenet')",
    )


def _load_encoder_weights(segmenter: nn.Module, encoder: str, path: Path) -> None:
    """Load an encoder state dict (or a whole segmenter's) from ``path`` into the segmenter."""
    state = read_state_dict(path)

    # A whole segmenter saved with model.state_dict() fits as it is.
    whole = segmenter.state_dict()
    if set(state) == set(whole) and all(state[key].shape == whole[key].shape for key in state):
        segmenter.load_state_dict(state)
        logger.info("loaded segmenter weights from %s", path)
        return

    target = segmenter.encoder.model if encoder.startswith("tu-") else segmenter.encoder
    expected = target.state_dict()
    state = {key.removeprefix("encoder."): value for key, value in state.items()}
    fitting = {key: value for key, value in state.items() if key in expected and value.shape == expected[key].shape}
    missing = [key for key in expected if key not in fitting and not key.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"weight file {path} does not fit encoder {encoder}: {len(missing)} tensors missing or of another shape "
            f"(e.g. {missing[0]}); pass weights of the same encoder or --pretrained none"
        )
    target.load_state_dict(fitting, strict=False)
    logger.info("loaded %s encoder weights from %s (%d tensors)", encoder, path, len(fitting))


def build_segmenter(model: str, encoder: str = "resnet18", *, num_classes: int, pretrained: str = "imagenet") -> nn.Module:
    """Build a semantic segmenter with ``num_classes`` output channels (background included).

    Args:
        model: ``unet``, ``fpn`` or ``linknet``.
        encoder: an smp encoder name, or ``tu-<timm model>``.
        num_classes: output channels; for a class map of K classes pass K + 1.
        pretrained: ``imagenet``, ``none`` or the path of a state-dict file of
            the whole segmenter or of its encoder.

    Raises:
        UserError: an unknown model or encoder (ConfigError), or weights that
            cannot be found or do not fit the encoder.
    """
    if model not in ARCHITECTURES:
        raise ConfigError(f"model {model!r} is not a segmenter; use one of {', '.join(ARCHITECTURES)}")
    check_encoder(encoder)
    if num_classes < 2:
        raise ConfigError(f"a segmenter needs background plus at least one class, got num_classes={num_classes}")

    # Weights come from the local caches only, so smp never downloads during a run.
    segmenter = ARCHITECTURES[model](encoder_name=encoder, encoder_weights=None, in_channels=3, classes=num_classes)
    is_imagenet = str(pretrained).strip().lower() == "imagenet"
    source = _imagenet_source(encoder) if is_imagenet else WeightSource()
    path = resolve_pretrained(pretrained, encoder, source)
    if path is not None:
        _load_encoder_weights(segmenter, encoder, path)
    return segmenter
