"""regimes: every model x regime takes one optimiser step; gradients only where allowed."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.models import create_model
from pipeline.training.optim import build_optimizer
from pipeline.training.regimes import (
    REGIMES,
    apply_regime,
    backbone_blocks,
    head_of,
    train_mode,
)

MODELS = ["baseline_cnn", "efficientnet_lite0", "resnet18", "resnet50", "vgg16_bn",
          "densenet121", "mobilenet_v3_large", "inception_v3"]


def _one_step(model, regime, size):
    """One SGD step; returns the plan, the parameters given a non-zero gradient,
    those the step changed, and those the optimiser holds."""
    plan = apply_regime(model, regime, lr=1e-2, top_blocks=2, backbone_lr_factor=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(TrainConfig(optimizer="sgd", weight_decay=0.0), plan.param_groups)
    train_mode(model)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    opt.step()
    graded = {n for n, p in model.named_parameters()
              if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    held = {names[id(p)] for group in opt.param_groups for p in group["params"]}
    return plan, graded, changed, held


@pytest.mark.parametrize("name", MODELS)
def test_each_model_takes_a_step_in_each_regime(name):
    size = 80 if name == "inception_v3" else 48  # inception needs >= 75 px
    for regime in REGIMES:
        model = create_model(name, 3, pretrained=False)
        names = {id(p): n for n, p in model.named_parameters()}
        head = {names[id(p)] for p in head_of(model).parameters()}
        plan, graded, changed, held = _one_step(model, regime, size)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        # Gradients, not changed values: with random weights and frozen (eval-mode)
        # batch norm, mobilenet_v3's pooled features are ~1e-9, so a weight update
        # can be below float32 resolution even though the gradient is there.
        assert head <= graded, (name, regime, sorted(head - graded)[:3])
        assert held == trainable, (name, regime)
        assert changed and changed <= trainable, (name, regime, sorted(changed - trainable)[:3])
        if regime == "feature_extract":
            assert trainable == head
        elif regime == "finetune_top":
            top = {names[id(p)] for block in backbone_blocks(model)[-2:] for m in block
                   for p in m.parameters()}
            assert trainable == head | top
        else:
            assert trainable == set(names.values())
        assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_frozen_batchnorm_keeps_its_running_statistics():
    model = create_model("resnet18", 2, pretrained=False)
    apply_regime(model, "feature_extract", lr=0.1)
    stats = model.bn1.running_mean.clone()
    train_mode(model)
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(stats, model.bn1.running_mean)
    assert not model.bn1.training and model.training


def test_discriminative_learning_rates():
    model = create_model("efficientnet_lite0", 2, pretrained=False)
    plan = apply_regime(model, "finetune_all", lr=1e-3, backbone_lr_factor=0.1)
    lrs = {g["name"]: g["lr"] for g in plan.param_groups}
    assert lrs == {"head": 1e-3, "backbone": pytest.approx(1e-4)}


def test_bad_regime_and_top_blocks_are_clear_errors():
    model = create_model("baseline_cnn", 2, pretrained=False)
    with pytest.raises(ValueError, match="train.regime"):
        apply_regime(model, "finetune_some", lr=0.1)
    with pytest.raises(ValueError, match="train.top_blocks"):
        apply_regime(model, "finetune_top", lr=0.1, top_blocks=99)
