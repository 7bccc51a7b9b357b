"""Optimiser, learning-rate schedule, loss and early stopping from ``train:`` params."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import OPTIMIZERS, SCHEDULERS, TrainConfig


def build_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over the regime's parameter groups, each with its own
    learning rate (:func:`pipeline.training.regimes.apply_regime` sets them from ``train.lr``)."""
    missing = [g.get("name", i) for i, g in enumerate(param_groups) if "lr" not in g]
    if missing:
        raise ValueError(f"parameter groups {missing} carry no learning rate")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    raise ValueError(f"unknown train.optimizer '{cfg.optimizer}'; choose one of {OPTIMIZERS}")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch multiplier: linear warm-up, then cosine to zero, step decay, or constant."""
    warm, total = cfg.warmup_epochs, max(1, cfg.epochs)
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown train.scheduler '{cfg.scheduler}'; choose one of {SCHEDULERS}")

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        if cfg.scheduler == "cosine":
            progress = (epoch - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.scheduler == "step":
            return cfg.gamma ** ((epoch - warm) // max(1, cfg.step_size))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(cfg: TrainConfig, labels: np.ndarray, num_classes: int) -> nn.CrossEntropyLoss:
    """Cross-entropy with label smoothing and, if asked, balanced class weights."""
    weight = None
    if cfg.class_weights:
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weight = torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without improving ``val_loss`` (0 = never stop)."""

    patience: int
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, val_loss: float) -> bool:
        """Record an epoch; True when training should stop."""
        if val_loss < self.best - 1e-6:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience
