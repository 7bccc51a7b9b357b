"""optim: schedules, optimisers, class weights, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.optim import (
    EarlyStopping,
    build_loss,
    build_optimizer,
    build_scheduler,
)


def _lrs(cfg: TrainConfig) -> list[float]:
    opt = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.lr}])
    sched = build_scheduler(cfg, opt)
    out = []
    for _ in range(cfg.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup():
    lrs = _lrs(TrainConfig(lr=1.0, epochs=6, warmup_epochs=2, scheduler="cosine"))
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0) and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_step_and_constant():
    assert _lrs(TrainConfig(lr=1.0, epochs=4, scheduler="step", step_size=2, gamma=0.5)) == \
        pytest.approx([1, 1, 0.5, 0.5])
    assert _lrs(TrainConfig(lr=0.3, epochs=3, scheduler="constant")) == pytest.approx([0.3] * 3)


def test_sgd_has_momentum_and_unknown_names_fail():
    opt = build_optimizer(TrainConfig(optimizer="sgd", momentum=0.8),
                          [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(TrainConfig(optimizer="lion"), [{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    with pytest.raises(ValueError, match="train.scheduler"):
        build_scheduler(TrainConfig(scheduler="poly"), opt)


def test_balanced_class_weights():
    loss = build_loss(TrainConfig(class_weights=True), np.array([0, 0, 0, 1]), 2)
    assert loss.weight.tolist() == pytest.approx([4 / 6, 2.0])
    assert build_loss(TrainConfig(), np.array([0, 1]), 2).weight is None


def test_early_stopping_counts_epochs_without_improvement():
    stop = EarlyStopping(patience=2)
    assert [stop.step(v) for v in [1.0, 0.9, 0.95, 0.92]] == [False, False, False, True]
    assert not any(EarlyStopping(patience=0).step(v) for v in [1, 2, 3, 4])
