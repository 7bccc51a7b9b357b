"""Distributed training with Ray Train: the only module that knows about ranks.

The driver (:func:`train`) puts the prepared arrays in Ray's object store, opens
one MLflow run, and starts a ``TorchTrainer``. Each worker runs
:func:`train_loop_per_worker`: the same model, data and loss code as a plain
PyTorch loop, plus ``prepare_model`` / ``prepare_data_loader`` for DDP, rank-0-only
MLflow logging and a checkpoint every epoch (resumed after a worker failure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import load_policy
from pipeline.config import TrainConfig, flatten
from pipeline.inference import ModelMeta, save_checkpoint, to_tensor
from pipeline.models import create_model, model_info
from pipeline.optim import EarlyStopping, build_loss, build_optimizer, build_scheduler
from pipeline.prepare import load_split, split_id
from pipeline.regimes import apply_regime
from pipeline.registry import log_pyfunc
from pipeline.tracking import setup_mlflow
from pipeline.utils import atomic_path, init_ray, seed_everything

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
RUN_ID_FILE = "mlflow_run_id.txt"


@dataclass(frozen=True)
class TrainResult:
    """Where the best model went and how training went."""

    model_path: Path
    run_id: str
    model_uri: str
    best_epoch: int
    history: pd.DataFrame


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


def train(
    cfg: TrainConfig,
    policy: dict[str, Any],
    prepared: str | Path,
    out_dir: str | Path,
    experiment: str,
    positive_class: str | None = None,
    extra_params: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``prepared`` with Ray Train; best checkpoint → ``out_dir``.

    ``policy`` is the Albumentations policy in its serialised form
    (:func:`pipeline.augment.policy`, or the file the ``augment`` stage wrote).
    """
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepared, out_dir = Path(prepared).resolve(), Path(out_dir)
    train_x, train_y, class_names = load_split(prepared, "train")
    val_x, val_y, _ = load_split(prepared, "val")
    info = model_info(cfg.model)
    meta = ModelMeta(cfg.model, tuple(class_names), int(train_x.shape[1]), info.mean, info.std,
                     positive_class)
    uri = setup_mlflow(experiment)
    init_ray()
    params = flatten({"train": asdict(cfg), **(extra_params or {})})
    params["augment.policy"] = ",".join(t["__class_fullname__"] for t in policy["transform"]["transforms"])
    store = _run_store(cfg, params, prepared)
    with mlflow.start_run(run_id=_previous_run_id(store), run_name="train",
                          log_system_metrics=cfg.system_metrics) as run:
        store.write(RUN_ID_FILE, run.info.run_id)
        mlflow.log_params({**params, "n_train": len(train_y), "n_val": len(val_y),
                           "class_names": ",".join(class_names), "image_size": meta.image_size})
        mlflow.log_dict(policy, "augment_policy.yaml")
        loop_config = {
            "cfg": cfg, "policy": policy, "meta": meta, "tracking_uri": uri,
            "run_id": run.info.run_id,
            "train": ray.put((np.asarray(train_x), train_y)),
            "val": ray.put((np.asarray(val_x), val_y)),
        }
        trainer = TorchTrainer(
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
            ),
        )
        result = trainer.fit()
        best_ckpt, best = min(result.best_checkpoints, key=lambda c: c[1]["val_loss"])
        out_dir.mkdir(parents=True, exist_ok=True)
        with best_ckpt.as_directory() as d, atomic_path(out_dir / MODEL_FILE) as tmp:
            shutil.copyfile(Path(d) / MODEL_FILE, tmp)
        history = _history(run.info.run_id)
        mlflow.log_metrics({"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                            "best_val_acc": best["val_acc"]})
        mlflow.log_artifact(str(out_dir / MODEL_FILE), artifact_path="checkpoint")
        model_uri = log_pyfunc(out_dir / MODEL_FILE, np.asarray(train_x[0]))
    # The run finished: a later run with the same settings starts afresh.
    store.delete()
    log.info("best epoch %d: val_loss %.4f val_acc %.4f", best["epoch"], best["val_loss"],
             best["val_acc"])
    return TrainResult(out_dir / MODEL_FILE, run.info.run_id, model_uri, int(best["epoch"]), history)


@dataclass(frozen=True)
class RunStore:
    """One Ray Train run folder, ``<storage>/<name>``, wherever ``train.storage_path`` is:
    a local or shared-filesystem path, or a URI pyarrow knows (``s3://``, ``gs://``,
    ``file://``). Every node must reach it; Ray Train writes checkpoints there."""

    storage: str  # Ray Train's storage_path: an absolute path or a URI
    name: str

    @classmethod
    def at(cls, storage_path: str, name: str) -> "RunStore":
        if "://" not in storage_path:
            storage_path = str(Path(storage_path).resolve())
        return cls(storage_path.rstrip("/"), name)

    @cached_property
    def _location(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The filesystem and the run folder's path on it (resolved once: for s3://
        pyarrow may ask the bucket for its region)."""
        fs, root = pyarrow.fs.FileSystem.from_uri(self.storage)
        return fs, f"{root.rstrip('/')}/{self.name}"

    def read(self, file: str) -> str | None:
        """The text of ``file`` in the run folder, or None when it is not there."""
        fs, path = self._location
        if fs.get_file_info(f"{path}/{file}").type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(f"{path}/{file}") as f:
            return f.read().decode()

    def write(self, file: str, text: str) -> None:
        fs, path = self._location
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{file}") as f:
            f.write(text.encode())

    def delete(self) -> None:
        fs, path = self._location
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)


def _run_store(cfg: TrainConfig, params: dict[str, Any], prepared: Path) -> RunStore:
    """Ray Train storage folder named by a hash of the settings and the data.

    Ray Train resumes a run whose ``(storage_path, name)`` already exists, so an
    interrupted ``dvc repro`` with unchanged params picks up from its last
    checkpoint, while any change of params or data starts a new run.
    """
    key = json.dumps(params, sort_keys=True, default=str)
    key += split_id(prepared, "train") + split_id(prepared, "val")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return RunStore.at(cfg.storage_path, f"{cfg.model}-{digest}")


def _previous_run_id(store: RunStore) -> str | None:
    """MLflow run of an interrupted attempt at this run, to continue it."""
    import mlflow

    text = store.read(RUN_ID_FILE)
    if text is None:
        return None
    run_id = text.strip()
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    log.info("resuming interrupted run %s from %s/%s", run_id, store.storage, store.name)
    return run_id


def _history(run_id: str) -> pd.DataFrame:
    """Per-epoch metrics of a run, one row per epoch, read back from MLflow."""
    import mlflow

    client = mlflow.MlflowClient()
    keys = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s",
            "trainable_params"]
    frames = [pd.DataFrame([(m.step, m.value) for m in client.get_metric_history(run_id, k)],
                           columns=["epoch", k]).drop_duplicates("epoch", keep="last").set_index("epoch")
              for k in keys]
    return pd.concat(frames, axis=1).sort_index().reset_index()


@dataclass
class _Loop:
    """What one epoch pass needs, built once per worker."""

    model: nn.Module
    loss_fn: nn.Module
    meta: ModelMeta
    device: torch.device
    channels_last: bool
    scaler: torch.amp.GradScaler | None
    rank: int


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build data and model, then train and validate per epoch."""
    import ray.train
    from ray.train.torch import get_device, prepare_data_loader, prepare_model

    cfg: TrainConfig = config["cfg"]
    meta: ModelMeta = config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = get_device()
    train_x, train_y = _get(config["train"])
    val_x, val_y = _get(config["val"])
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = prepare_data_loader(DataLoader(
        ArrayDataset(train_x, train_y, load_policy(config["policy"], cfg.seed + rank)),
        batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=g,
        drop_last=len(train_y) > cfg.batch_size * world))
    val_loader = prepare_data_loader(DataLoader(
        ArrayDataset(val_x, val_y), batch_size=cfg.batch_size * 2, collate_fn=collate))

    num_classes = len(meta.class_names)
    model = create_model(cfg.model, num_classes, pretrained=cfg.pretrained and cfg.regime != "scratch")
    plan = apply_regime(model, cfg.regime, cfg.lr, cfg.top_blocks, cfg.backbone_lr_factor)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    optimizer = build_optimizer(cfg, plan.param_groups)
    scheduler = build_scheduler(cfg, optimizer)
    stopper = EarlyStopping(cfg.early_stopping_patience)
    amp = cfg.amp and device.type == "cuda"
    loop = _Loop(model, build_loss(cfg, train_y, num_classes).to(device), meta, device,
                 cfg.channels_last, torch.amp.GradScaler("cuda") if amp else None, rank)

    start_epoch = _resume(ray.train.get_checkpoint(), model, optimizer, scheduler, stopper)
    mlflow_run = _open_mlflow(config) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, n_seen = _run_epoch(loop, train_loader, epoch, optimizer)
        scheduler.step()
        elapsed = time.perf_counter() - t0
        val_loss, val_acc, _ = _run_epoch(loop, val_loader, epoch)
        stop = stopper.step(val_loss)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                   "epoch_time_s": elapsed, "images_per_s": n_seen / elapsed,
                   "trainable_params": plan.trainable}
        _report(metrics, model, optimizer, scheduler, stopper, meta, rank, mlflow_run)
        if stop:
            log.info("early stopping after epoch %d: no val_loss improvement for %d epochs",
                     epoch + 1, stopper.patience)
            break


def _get(ref):
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _open_mlflow(config: dict[str, Any]):
    import mlflow

    mlflow.set_tracking_uri(config["tracking_uri"])
    return mlflow.MlflowClient(), config["run_id"]


def _run_epoch(loop: _Loop, loader, epoch: int, optimizer=None) -> tuple[float, float, int]:
    """One pass over ``loader`` (training if ``optimizer``), averaged over all workers."""
    from tqdm.auto import tqdm

    from pipeline.regimes import train_mode

    train_mode(loop.model) if optimizer is not None else loop.model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=loop.device)  # loss sum, correct, count
    desc = f"epoch {epoch + 1} {'train' if optimizer else 'val'}"
    with torch.set_grad_enabled(optimizer is not None):
        for images, labels in tqdm(loader, desc=desc, disable=loop.rank != 0, mininterval=10):
            x = to_tensor(images, loop.meta, loop.device, loop.channels_last)
            labels = labels.to(loop.device)
            with torch.autocast(loop.device.type, enabled=loop.scaler is not None):
                logits = loop.model(x)
                loss = loop.loss_fn(logits.float(), labels)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                if loop.scaler is not None:
                    loop.scaler.scale(loss).backward()
                    loop.scaler.step(optimizer)
                    loop.scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
            totals += torch.tensor([loss.item() * len(labels),
                                    (logits.argmax(1) == labels).sum().item(), len(labels)],
                                   dtype=torch.float64, device=loop.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


def _report(metrics, model, optimizer, scheduler, stopper, meta, rank, mlflow_run) -> None:
    """Report epoch metrics to Ray Train; rank 0 also checkpoints and logs to MLflow."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    client, run_id = mlflow_run
    step = metrics["epoch"]
    for key, value in metrics.items():
        if key != "epoch":
            client.log_metric(run_id, key, float(value), step=step)
    with tempfile.TemporaryDirectory() as d:
        module = model.module if hasattr(model, "module") else model
        save_checkpoint(Path(d) / MODEL_FILE, module, meta)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": metrics["epoch"], "stopper": asdict(stopper)}, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _resume(checkpoint, model, optimizer, scheduler, stopper) -> int:
    """Load the last checkpoint after a restart; return the epoch to start from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        weights = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(weights["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stopper.best, stopper.bad_epochs = state["stopper"]["best"], state["stopper"]["bad_epochs"]
    log.info("resumed from checkpoint after epoch %d", state["epoch"])
    return int(state["epoch"])
