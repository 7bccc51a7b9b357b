"""One epoch of training or evaluation in plain PyTorch: the dataset, the batch
collation and the per-epoch passes that every Ray Train worker runs.

Nothing here knows about Ray: the same functions drive a plain loop (the
benchmarks' baseline). Under DDP the epoch totals are summed over workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pipeline.config import UserError
from pipeline.serving.inference import ModelMeta, to_tensor
from pipeline.training.regimes import train_mode


class NonFiniteLossError(UserError, ArithmeticError):
    """The training loss became NaN or infinite: training diverged."""


class ArrayDataset(Dataset):
    """uint8 images + integer labels, augmented per item with Albumentations."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        img = np.asarray(self.images[i])
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return img, int(self.labels[i])


def collate(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images (normalised later, on the device) and labels."""
    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    return images, torch.tensor([b[1] for b in batch])


def _init_loader_worker(worker_id: int) -> None:
    """Each loader process draws its own augmentations: a forked copy of the transform would
    repeat its parent's (and every other worker's) random draws. (OpenCV's thread count is left
    alone: ``cv2.setNumThreads`` in a child forked after the parent used OpenCV hangs.)"""
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(info.seed % 2**32)


def loader_workers(requested: int, device: torch.device) -> int:
    """``train.loader_workers``; -1 (auto): none on CPU, where the worker's cores run torch, and 4
    on a GPU, whose step outruns one augmenting thread (H100, 96 px, batch 64: none reached 0.65
    of the model's step rate, 4 reached it; docs/performance-gpu.md)."""
    if requested >= 0:
        return requested
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0


def make_loader(dataset: ArrayDataset, batch_size: int, device: torch.device, workers: int = 0,
                **kwargs) -> DataLoader:
    """A loader of uint8 batches; with ``workers``, that many processes augment ahead of the
    step (pinned memory when the batches go to a GPU)."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=_init_loader_worker if workers else None, **kwargs)


@dataclass
class EpochContext:
    """What every epoch of one worker needs, built once."""

    model: nn.Module
    loss_fn: nn.Module
    meta: ModelMeta
    device: torch.device
    channels_last: bool
    scaler: torch.amp.GradScaler | None  # CUDA mixed precision only
    rank: int


def forward_batch(ctx: EpochContext, images: torch.Tensor, labels: torch.Tensor):
    """Logits and loss of one batch (autocast on CUDA with AMP)."""
    x = to_tensor(images, ctx.meta, ctx.device, ctx.channels_last)
    labels = labels.to(ctx.device)
    with torch.autocast(ctx.device.type, enabled=ctx.scaler is not None):
        logits = ctx.model(x)
        loss = ctx.loss_fn(logits.float(), labels)
    return logits, loss, labels


def _batch_totals(ctx: EpochContext, logits, loss, labels) -> torch.Tensor:
    """Loss sum, correct count and count of one batch."""
    return torch.tensor([loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(),
                         len(labels)], dtype=torch.float64, device=ctx.device)


def _all_workers(totals: torch.Tensor) -> tuple[float, float, int]:
    """Mean loss, accuracy and count over every worker's totals."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


def finite_on_every_worker(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every worker (all of them stop together if not)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def optimizer_step(ctx: EpochContext, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward and one optimiser step (through the gradient scaler with CUDA mixed precision)."""
    optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        optimizer.step()


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of its DDP wrapper if it has one."""
    return model.module if hasattr(model, "module") else model


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and batch-norm statistics, updated
    after every optimiser step (``train.ema_decay``; 0: none). Its first steps average with
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, as timm's EMA warm-up does, so the
    pretrained starting weights do not linger in a short run."""
    if decay <= 0:
        return None

    @torch.no_grad()
    def ema(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        # called once per device and dtype, not per tensor: one read of n (a GPU sync), not hundreds
        updates = float(n)
        d = min(decay, (1 + updates) / (10 + updates))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # batch norm's integer step counts
            for a, c in zip(averaged, current):
                a.copy_(a * d + c * (1 - d))

    return AveragedModel(unwrap(model), multi_avg_fn=ema, use_buffers=True)


def train_one_epoch(ctx: EpochContext, loader, optimizer: torch.optim.Optimizer,
                    epoch: int, ema: AveragedModel | None = None) -> tuple[float, float, int]:
    """One training pass; mean loss, accuracy and images seen over all workers (``ema``, if
    given, is updated after each step).

    Raises:
        NonFiniteLossError: on every worker at once, before a NaN/inf loss is stepped on.
    """
    train_mode(ctx.model)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for step, (images, labels) in enumerate(loader):
        logits, loss, labels = forward_batch(ctx, images, labels)
        if not finite_on_every_worker(loss):
            raise NonFiniteLossError(f"the training loss became {loss.item()} at epoch {epoch + 1}, "
                                     f"batch {step + 1} (on this worker or another)")
        optimizer_step(ctx, optimizer, loss)
        if ema is not None:
            ema.update_parameters(unwrap(ctx.model))
        totals += _batch_totals(ctx, logits, loss, labels)
    return _all_workers(totals)


@torch.no_grad()
def evaluate_epoch(ctx: EpochContext, loader) -> tuple[float, float]:
    """One validation pass; mean loss and accuracy over all workers."""
    ctx.model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for images, labels in loader:
        totals += _batch_totals(ctx, *forward_batch(ctx, images, labels))
    loss, acc, _ = _all_workers(totals)
    return loss, acc
