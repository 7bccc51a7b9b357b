"""Transfer-learning regimes: which parameters train, and at which learning rate.

``scratch``          random init, everything trains
``feature_extract``  pretrained backbone frozen (its BatchNorm in eval mode), only the new head trains
``finetune_top``     the head and the last ``top_blocks`` backbone blocks train
``finetune_all``     everything trains; the backbone at ``lr * backbone_lr_factor``

A *block* is a child of the model, or of a ``Sequential``/``ModuleList`` child
(timm's ``blocks``, torchvision's ``features``, ResNet's ``layerN``), in forward
order; a normalisation layer belongs to the block before it (conv + BN = one
block). The head is the last ``nn.Linear``, the one ``create_model`` replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.config import REGIMES
from pipeline.models import head_of

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class RegimePlan:
    """Parameter groups for the optimiser and counts for the logs."""

    param_groups: list[dict]
    trainable: int
    total: int


def backbone_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The model's parametrised blocks below the head, in forward order."""
    head = head_of(model)
    units: list[nn.Module] = []
    top = list(model.children()) if not isinstance(model, nn.Sequential) else list(model)
    for child in top:
        units += list(child.children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else [child]
    blocks: list[list[nn.Module]] = []
    for unit in units:
        if unit is head or not any(True for _ in unit.parameters()):
            continue
        if isinstance(unit, _NORM) and blocks:
            blocks[-1].append(unit)
        else:
            blocks.append([unit])
    return blocks


def apply_regime(model: nn.Module, regime: str, lr: float, top_blocks: int = 2,
                 backbone_lr_factor: float = 1.0) -> RegimePlan:
    """Freeze what ``regime`` freezes; return optimiser groups (head at ``lr``)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown train.regime '{regime}'; choose one of {REGIMES}")
    head = head_of(model)
    blocks = backbone_blocks(model)
    if regime in ("scratch", "finetune_all"):
        trainable_blocks = blocks
    elif regime == "finetune_top":
        if not 0 < top_blocks <= len(blocks):
            raise ValueError(f"train.top_blocks must be in 1..{len(blocks)} for this model")
        trainable_blocks = blocks[-top_blocks:]
    else:
        trainable_blocks = []
    model.requires_grad_(regime in ("scratch", "finetune_all"))
    for block in trainable_blocks:
        for module in block:
            module.requires_grad_(True)
    head.requires_grad_(True)
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    factor = 1.0 if regime == "scratch" else backbone_lr_factor
    groups = [{"params": list(head.parameters()), "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * factor, "name": "backbone"})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return RegimePlan(groups, trainable, sum(p.numel() for p in model.parameters()))


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but frozen normalisation layers keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, _NORM) and not any(p.requires_grad for p in module.parameters()):
            module.eval()
