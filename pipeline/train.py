"""Distributed training with Ray Train: the only module that knows about ranks.

The driver (:func:`train`) puts the prepared arrays in Ray's object store, opens
one MLflow run, and starts a ``TorchTrainer``. Each worker runs
:func:`train_loop_per_worker`: the same model, data and loss code as a plain
PyTorch loop, plus ``prepare_model`` / ``prepare_data_loader`` for DDP, rank-0-only
MLflow logging and a checkpoint every epoch (resumed after a worker failure).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import run_notes
from pipeline.augment import load_policy
from pipeline.config import TrainConfig, UserError, flatten
from pipeline.console import epoch_line, quiet_train_worker
from pipeline.engine import (ArrayDataset, EpochContext, NonFiniteLossError, evaluate_epoch, loader_workers,
                             make_loader, train_one_epoch)
from pipeline.inference import ModelMeta, save_checkpoint
from pipeline.models import create_model, model_info
from pipeline.optim import EarlyStopping, build_loss, build_optimizer, build_scheduler
from pipeline.prepared import PreparedData, Split
from pipeline.regimes import apply_regime
from pipeline.runs import RUN_ID_FILE, RunStore, previous_run_id, run_history, run_store
from pipeline.serving import log_model
from pipeline.tracking import end_failed_run, setup_mlflow
from pipeline.utils import atomic_path, init_ray, seed_everything

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
DIVERGED = "diverged"  # the run tag rank 0 sets when the loss stopped being finite


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; no model came out of the run."""


@dataclass(frozen=True)
class TrainResult:
    """Where the best model went and how training went."""

    model_path: Path
    run_id: str
    model_uri: str
    best_epoch: int
    history: pd.DataFrame


def train(
    cfg: TrainConfig,
    policy: dict[str, Any],
    prepared: str | Path,
    out_dir: str | Path,
    experiment: str,
    extra_params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    register_model: bool = True,
) -> TrainResult:
    """Train ``cfg.model`` on ``prepared`` with Ray Train; best checkpoint → ``out_dir``.

    ``policy`` is the Albumentations policy in its serialised form
    (:func:`pipeline.augment.policy`, or the file the ``augment`` stage wrote). A trial of
    a sweep or a cross-validation fold passes ``parent_run_id`` (its MLflow run is a child
    of that run) and ``register_model=False`` (the checkpoint is enough: no MLflow model).
    """
    import mlflow

    data, out_dir = PreparedData(Path(prepared).resolve()), Path(out_dir)
    train_split, val_split = data.split("train"), data.split("val")
    info = model_info(cfg.model)
    meta = ModelMeta(cfg.model, tuple(data.class_names), data.image_size, info.mean, info.std)
    uri = setup_mlflow(experiment)
    init_ray()
    params = flatten({"train": asdict(cfg), **(extra_params or {})})
    params["augment.policy"] = ",".join(t["__class_fullname__"] for t in policy["transform"]["transforms"])
    store = run_store(cfg.storage_path, cfg.model, params, data)
    run = mlflow.start_run(run_id=previous_run_id(store), parent_run_id=parent_run_id,
                           run_name=run_name or run_notes.run_name(cfg.model, cfg.regime,
                                                                   meta.image_size, cfg.epochs),
                           description=run_notes.run_description(cfg, data, experiment),
                           log_system_metrics=cfg.system_metrics)
    try:
        store.write(RUN_ID_FILE, run.info.run_id)
        run_notes.log_inputs(data, experiment)
        mlflow.log_params({**params, "n_train": len(train_split), "n_val": len(val_split),
                           "class_names": ",".join(data.class_names), "image_size": meta.image_size})
        mlflow.log_dict(policy, "augment_policy.yaml")
        loop_config = {"cfg": cfg, "policy": policy, "meta": meta, "tracking_uri": uri,
                       "run_id": run.info.run_id, "train": _to_object_store(train_split),
                       "val": _to_object_store(val_split)}
        result = _trainer(cfg, store, loop_config).fit()
        diverged = mlflow.get_run(run.info.run_id).data.tags.get(DIVERGED)
        if diverged:
            store.delete()  # resuming would diverge again
            raise TrainingDiverged(f"training diverged: {diverged}; no model was "
                                   f"saved or logged. Lower train.lr (now {cfg.lr:g}) or check the "
                                   "data, then run again")
        best = _best_checkpoint(result, out_dir / MODEL_FILE)
        history = run_history(run.info.run_id)
        mlflow.log_metrics({"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                            "best_val_acc": best["val_acc"]})
        mlflow.log_artifact(str(out_dir / MODEL_FILE), artifact_path="checkpoint")
        model_uri = (log_model(out_dir / MODEL_FILE, np.asarray(train_split.images[0]), data.class_names)
                     if register_model else "")
    except BaseException as exc:
        end_failed_run(uri, exc, kept=f"the checkpoints are kept in {store.storage}/{store.name}")
        raise
    mlflow.end_run()
    # The run finished: a later run with the same settings starts afresh.
    store.delete()
    log.info("best epoch %d: val_loss %.4f val_acc %.4f", best["epoch"], best["val_loss"],
             best["val_acc"])
    return TrainResult(out_dir / MODEL_FILE, run.info.run_id, model_uri, int(best["epoch"]), history)


def _to_object_store(split: Split):
    """One split's images and labels in Ray's object store, shared by the workers of a node."""
    import ray

    return ray.put((np.asarray(split.images), split.labels))


def _trainer(cfg: TrainConfig, store: RunStore, loop_config: dict[str, Any]):
    """The ``TorchTrainer`` of one run: workers from params, checkpoints in ``store``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=store.name,
            storage_path=store.storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # details: Ray's session logs
        ),
    )


def _best_checkpoint(result, dest: Path) -> dict[str, Any]:
    """Copy the weights of the lowest-val_loss checkpoint to ``dest``; return its metrics."""
    best_ckpt, best = min(result.best_checkpoints, key=lambda c: c[1]["val_loss"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with best_ckpt.as_directory() as d, atomic_path(dest) as tmp:
        shutil.copyfile(Path(d) / MODEL_FILE, tmp)
    return best


@dataclass
class TrainingState:
    """What a checkpoint restores: the optimiser, its schedule and early stopping."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    stopper: EarlyStopping


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build data and model, then train and validate per epoch."""
    import ray.train
    from ray.train.torch import get_device

    cfg: TrainConfig = config["cfg"]
    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = get_device()
    train_loader, val_loader, train_labels = _loaders(config, rank, world)
    epoch_ctx, state, trainable = _build_model(cfg, config["meta"], train_labels, device, rank)
    start_epoch = _resume(ray.train.get_checkpoint(), epoch_ctx.model, state)
    mlflow_run = _open_mlflow(config) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        lr = state.optimizer.param_groups[0]["lr"]
        try:
            train_loss, train_acc, n_seen = train_one_epoch(epoch_ctx, train_loader, state.optimizer,
                                                            epoch)
        except NonFiniteLossError as exc:  # not a worker failure: retrying would diverge again
            if mlflow_run is not None:  # every worker stops here together; rank 0 records why
                client, run_id = mlflow_run
                client.set_tag(run_id, DIVERGED, str(exc))
            return
        state.scheduler.step()
        elapsed = time.perf_counter() - t0
        val_loss, val_acc = evaluate_epoch(epoch_ctx, val_loader)
        if not math.isfinite(val_loss):  # the same all-reduced value on every worker: all stop
            if mlflow_run is not None:
                client, run_id = mlflow_run
                client.set_tag(run_id, DIVERGED, f"the validation loss became {val_loss} after epoch "
                                                 f"{epoch + 1}: the weights are no longer finite")
            return
        stop = state.stopper.step(val_loss)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                   "epoch_time_s": elapsed, "images_per_s": n_seen / elapsed,
                   "trainable_params": trainable}
        report_epoch(metrics, epoch_ctx, state, mlflow_run)
        if rank == 0:
            print(epoch_line(metrics, cfg.epochs), flush=True)
        if stop:
            if rank == 0:
                print(f"early stopping after epoch {epoch + 1}: no val_loss improvement for "
                      f"{state.stopper.patience} epochs", flush=True)
            break


def _loaders(config: dict[str, Any], rank: int, world: int):
    """Sharded training and validation loaders, and the training labels."""
    from ray.train.torch import get_device, prepare_data_loader

    cfg: TrainConfig = config["cfg"]
    train_x, train_y = object_store_value(config["train"])
    val_x, val_y = object_store_value(config["val"])
    g = torch.Generator().manual_seed(cfg.seed)
    device = get_device()
    train_loader = prepare_data_loader(make_loader(
        ArrayDataset(train_x, train_y, load_policy(config["policy"], cfg.seed + rank)),
        cfg.batch_size, device, loader_workers(cfg.loader_workers, device), shuffle=True, generator=g,
        drop_last=len(train_y) > cfg.batch_size * world))
    # validation has no augmentation to do ahead: it stacks its batches in this process
    val_loader = prepare_data_loader(make_loader(ArrayDataset(val_x, val_y), cfg.batch_size * 2, device))
    return train_loader, val_loader, train_y


def _build_model(cfg: TrainConfig, meta: ModelMeta, train_labels: np.ndarray, device: torch.device,
                 rank: int) -> tuple[EpochContext, TrainingState, int]:
    """The model in its regime, wrapped for DDP, with its optimiser, schedule and loss."""
    from ray.train.torch import prepare_model

    num_classes = len(meta.class_names)
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and cfg.regime != "scratch")
    plan = apply_regime(model, cfg.regime, cfg.lr, cfg.top_blocks, cfg.backbone_lr_factor)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    optimizer = build_optimizer(cfg, plan.param_groups)
    state = TrainingState(optimizer, build_scheduler(cfg, optimizer),
                          EarlyStopping(cfg.early_stopping_patience))
    amp = cfg.amp and device.type == "cuda"
    ctx = EpochContext(model, build_loss(cfg, train_labels, num_classes).to(device), meta, device,
                       cfg.channels_last, torch.amp.GradScaler("cuda") if amp else None, rank)
    return ctx, state, plan.trainable


def object_store_value(ref):
    """The value behind a Ray object reference (or the value itself, in a plain loop)."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _open_mlflow(config: dict[str, Any]):
    import mlflow

    setup_mlflow(uri=config["tracking_uri"])
    return mlflow.MlflowClient(), config["run_id"]


def report_epoch(metrics: dict[str, float], ctx: EpochContext, state: TrainingState,
                 mlflow_run) -> None:
    """Report epoch metrics to Ray Train; rank 0 also checkpoints and logs to MLflow."""
    import ray.train
    from ray.train import Checkpoint

    if ctx.rank != 0:
        ray.train.report(metrics)
        return
    client, run_id = mlflow_run
    step = metrics["epoch"]
    for key, value in metrics.items():
        if key != "epoch":
            client.log_metric(run_id, key, float(value), step=step)
    with tempfile.TemporaryDirectory() as d:
        module = ctx.model.module if hasattr(ctx.model, "module") else ctx.model
        save_checkpoint(Path(d) / MODEL_FILE, module, ctx.meta)
        torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                    "epoch": metrics["epoch"], "stopper": asdict(state.stopper)}, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _resume(checkpoint, model: nn.Module, state: TrainingState) -> int:
    """Load the last checkpoint after a restart; return the epoch to start from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        weights = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
        saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(weights["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.stopper.best, state.stopper.bad_epochs = saved["stopper"]["best"], saved["stopper"]["bad_epochs"]
    log.info("resumed from checkpoint after epoch %d", saved["epoch"])
    return int(saved["epoch"])
