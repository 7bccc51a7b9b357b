"""One Ray Train worker: the loop every worker runs, rank-0 MLflow logging, checkpoint and resume.

The model, data and loss code underneath (:mod:`pipeline.training.engine`) runs the same in a
plain loop; this module adds what distribution needs: ``prepare_model`` and
``prepare_data_loader`` for DDP, a checkpoint every epoch (resumed after a worker failure) and
logging from rank 0 only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.config import TrainConfig
from pipeline.console import epoch_line, quiet_train_worker
from pipeline.data.augment import load_policy
from pipeline.env import seed_everything
from pipeline.models import create_model
from pipeline.serving.inference import ModelMeta, save_checkpoint
from pipeline.tracking import RunLogger
from pipeline.training.engine import (
    ArrayDataset,
    EpochContext,
    NonFiniteLossError,
    evaluate_epoch,
    loader_workers,
    make_loader,
    train_one_epoch,
    unwrap,
    weight_average,
)
from pipeline.training.optim import (
    EarlyStopping,
    build_loss,
    build_optimizer,
    build_scheduler,
)
from pipeline.training.regimes import apply_regime

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
DIVERGED = "diverged"  # the run tag rank 0 sets when the loss stopped being finite


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker gets from the driver (Ray pickles it once per worker)."""

    train: TrainConfig
    policy: dict[str, Any]  # the Albumentations policy, serialised
    meta: ModelMeta
    tracking_uri: str
    run_id: str
    train_data: Any  # Ray object reference to (images, labels), or the arrays themselves
    val_data: Any


@dataclass
class TrainingState:
    """What a checkpoint restores: the optimiser, its schedule, early stopping and the weight
    average (``train.ema_decay``), which is the model validated and kept when there is one."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    stopper: EarlyStopping
    ema: AveragedModel | None = None


def train_loop_per_worker(config: WorkerConfig) -> None:
    """One Ray Train worker: build data and model, then train and validate per epoch. A
    non-finite loss stops every worker together; rank 0 tags the run with the reason."""
    import ray.train

    cfg = config.train
    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    train_loader, val_loader, train_labels = _loaders(config, rank, world)
    epoch_ctx, state, trainable = _build_model(cfg, config.meta, train_labels, rank)
    start_epoch = resume(ray.train.get_checkpoint(), epoch_ctx.model, state)
    logger = RunLogger.connect(config.tracking_uri, config.run_id) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        try:
            metrics = _epoch(epoch_ctx, state, train_loader, val_loader, epoch)
        except NonFiniteLossError as exc:  # not a worker failure: retrying would diverge again
            if logger is not None:
                logger.set_tag(DIVERGED, str(exc))
            return
        stop = state.stopper.step(metrics["val_loss"])
        report_epoch({**metrics, "trainable_params": trainable}, epoch_ctx, state, logger)
        if logger is not None:
            print(epoch_line(metrics, cfg.epochs), flush=True)
            if stop:
                print(f"early stopping after epoch {epoch + 1}: no val_loss improvement for "
                      f"{state.stopper.patience} epochs", flush=True)
        if stop:
            break


def _epoch(ctx: EpochContext, state: TrainingState, train_loader, val_loader, epoch: int) -> dict:
    """Train and validate one epoch; its metrics.

    Raises:
        NonFiniteLossError: the training or validation loss stopped being finite (the same
            all-reduced value on every worker, so all stop together).
    """
    if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    train_loss, train_acc, n_seen = train_one_epoch(ctx, train_loader, state.optimizer, epoch, state.ema)
    state.scheduler.step()
    elapsed = time.perf_counter() - t0
    val_loss, val_acc = evaluate_epoch(ctx if state.ema is None else replace(ctx, model=state.ema.module),
                                       val_loader)
    if not math.isfinite(val_loss):
        raise NonFiniteLossError(f"the validation loss became {val_loss} after epoch {epoch + 1}: "
                                 "the weights are no longer finite")
    return {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "epoch_time_s": elapsed,
            "images_per_s": n_seen / elapsed}


def _loaders(config: WorkerConfig, rank: int, world: int):
    """Sharded training and validation loaders, and the training labels."""
    from ray.train.torch import get_device, prepare_data_loader

    cfg = config.train
    train_x, train_y = object_store_value(config.train_data)
    val_x, val_y = object_store_value(config.val_data)
    g = torch.Generator().manual_seed(cfg.seed)
    device = get_device()
    train_loader = prepare_data_loader(make_loader(
        ArrayDataset(train_x, train_y, load_policy(config.policy, cfg.seed + rank)),
        cfg.batch_size, device, loader_workers(cfg.loader_workers, device), shuffle=True, generator=g,
        drop_last=len(train_y) > cfg.batch_size * world))
    # validation has no augmentation to do ahead: it stacks its batches in this process
    val_loader = prepare_data_loader(make_loader(ArrayDataset(val_x, val_y), cfg.batch_size * 2, device))
    return train_loader, val_loader, train_y


def _build_model(cfg: TrainConfig, meta: ModelMeta, train_labels: np.ndarray,
                 rank: int) -> tuple[EpochContext, TrainingState, int]:
    """The model in its regime, wrapped for DDP, with its optimiser, schedule and loss."""
    from ray.train.torch import get_device, prepare_model

    device = get_device()
    num_classes = len(meta.class_names)
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and cfg.regime != "scratch")
    plan = apply_regime(model, cfg.regime, cfg.lr, cfg.top_blocks, cfg.backbone_lr_factor)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    optimizer = build_optimizer(cfg, plan.param_groups)
    state = TrainingState(optimizer, build_scheduler(cfg, optimizer),
                          EarlyStopping(cfg.early_stopping_patience), weight_average(model, cfg.ema_decay))
    amp = cfg.amp and device.type == "cuda"
    ctx = EpochContext(model, build_loss(cfg, train_labels, num_classes).to(device), meta, device,
                       cfg.channels_last, torch.amp.GradScaler("cuda") if amp else None, rank)
    return ctx, state, plan.trainable


def object_store_value(ref):
    """The value behind a Ray object reference (or the value itself, in a plain loop)."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def report_epoch(metrics: dict[str, float], ctx: EpochContext, state: TrainingState,
                 logger: RunLogger | None) -> None:
    """Report epoch metrics to Ray Train; rank 0 also checkpoints and logs to MLflow."""
    import ray.train
    from ray.train import Checkpoint

    if logger is None:
        ray.train.report(metrics)
        return
    logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=metrics["epoch"])
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(Path(d), ctx, state, metrics["epoch"])
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def write_checkpoint(directory: Path, ctx: EpochContext, state: TrainingState, epoch: int) -> None:
    """The model file (what is kept and served: the weight average when there is one) and the
    training state that :func:`resume` restores."""
    save_checkpoint(directory / MODEL_FILE, unwrap(ctx.model) if state.ema is None else state.ema.module,
                    ctx.meta)
    saved = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
             "epoch": epoch, "stopper": asdict(state.stopper)}
    if state.ema is not None:  # training goes on from the weights, not from their average
        saved |= {"weights": unwrap(ctx.model).state_dict(), "ema": state.ema.state_dict()}
    torch.save(saved, directory / STATE_FILE)


def resume(checkpoint, model: nn.Module, state: TrainingState) -> int:
    """Load the last checkpoint after a restart; return the epoch to start from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        # with a weight average the model file holds the average; the weights are in the state
        weights = (saved["weights"] if "weights" in saved
                   else torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)["model"])
    unwrap(model).load_state_dict(weights)
    if state.ema is not None:
        state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.stopper.best, state.stopper.bad_epochs = saved["stopper"]["best"], saved["stopper"]["bad_epochs"]
    log.info("resumed from checkpoint after epoch %d", saved["epoch"])
    return int(saved["epoch"])
