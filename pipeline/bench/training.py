"""Training throughput: Ray Train (each worker layout) against the same epoch code in a
plain loop, and augmentation against pre-materialised images, on a slice of the data."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.data.augment import load_policy, policy
from pipeline.data.prepared import PreparedData, write_resplit
from pipeline.models import create_model, model_info
from pipeline.serving.inference import ModelMeta
from pipeline.training.engine import (
    ArrayDataset,
    EpochContext,
    make_loader,
    train_one_epoch,
)
from pipeline.training.optim import build_loss, build_optimizer, build_scheduler
from pipeline.training.regimes import apply_regime

WARMUP_EPOCHS = 1  # the first epoch (allocations, caches) is not counted


def slice_of(prepared: Path, n_train: int, n_val: int, dest: Path) -> PreparedData:
    """A prepared folder of ``n_train`` training and ``n_val`` validation cells drawn at random
    (seeded: the splits are stored class by class, so the first rows would be one class)."""
    data = PreparedData(prepared)
    train, val = data.rows("train"), data.rows("val")
    rows = pd.concat([train.sample(min(n_train, len(train)), random_state=0),
                      val.sample(min(n_val, len(val)), random_state=0)])
    return write_resplit(data, rows.set_index("path")["split"], dest)


def plain_loop(data: PreparedData, cfg: TrainConfig, augment: AugmentConfig | None, batch_size: int,
               threads: int, epochs: int, compile_model: bool = False) -> tuple[float, float]:
    """Median images/s after warm-up of the training epoch code in one process, and the
    warm-up epoch's seconds (with ``compile_model``, ``torch.compile``'s work is in them)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    split = data.split("train")
    info = model_info(cfg.model)
    meta = ModelMeta(cfg.model, tuple(data.class_names), data.image_size, info.mean, info.std)
    model = create_model(cfg.model, len(data.class_names), pretrained=cfg.pretrained)
    plan = apply_regime(model, cfg.regime, cfg.lr, cfg.top_blocks, cfg.backbone_lr_factor)
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, plan.param_groups)
    build_scheduler(cfg, optimizer)
    if compile_model:
        model = torch.compile(model)
    transform = load_policy(policy(augment, data.image_size), cfg.seed) if augment else None
    loader = make_loader(ArrayDataset(split.images, split.labels, transform), batch_size, torch.device("cpu"),
                         shuffle=True, drop_last=True)
    ctx = EpochContext(model, build_loss(cfg, split.labels, len(data.class_names)), meta,
                       torch.device("cpu"), True, None, 0)
    seen, seconds = [], []
    for epoch in range(WARMUP_EPOCHS + epochs):
        t0 = time.perf_counter()
        seen.append(train_one_epoch(ctx, loader, optimizer, epoch)[2])
        seconds.append(time.perf_counter() - t0)
    rates = [n / s for n, s in zip(seen, seconds)]
    return statistics.median(rates[WARMUP_EPOCHS:]), sum(seconds[:WARMUP_EPOCHS])


def ray_train(data: PreparedData, cfg: TrainConfig, augment: AugmentConfig, work: Path,
              epochs: int) -> float:
    """Median images/s after warm-up of ``pipeline.training.driver.train`` (Ray Train, MLflow, checkpoints)."""
    from pipeline.training.driver import RunOptions, train

    cfg = replace(cfg, epochs=WARMUP_EPOCHS + epochs, system_metrics=False,
                  storage_path=str((work / "ray").resolve()), early_stopping_patience=0)
    result = train(cfg, policy(augment, data.image_size), data.root, work / "model",
                   "benchmark", RunOptions(register_model=False))
    return float(result.history["images_per_s"].iloc[WARMUP_EPOCHS:].median())


def training(prepared: Path, cfg: TrainConfig, augment: AugmentConfig, n_train: int, epochs: int,
             work: Path, both_layouts: bool = True) -> dict[str, Any]:
    """Ray Train at all cores x 1 worker (and, with ``both_layouts``, 1 worker x all cores) vs
    the plain loop at the same global batch; the plain loop with augmentation vs without, and
    eager vs ``torch.compile``."""
    from pipeline.bench.scoring import cores

    n = cores()
    data = slice_of(prepared, n_train, max(64, n_train // 8), work / "slice")
    global_batch = cfg.batch_size * n
    plain, eager_warmup_s = plain_loop(data, cfg, augment, global_batch, n, epochs)
    plain_no_aug, _ = plain_loop(data, cfg, None, global_batch, n, epochs)
    compiled, compiled_warmup_s = plain_loop(data, cfg, augment, global_batch, n, epochs, compile_model=True)
    layouts = {}
    for workers, cpus in ((1, n), (n, 1)) if both_layouts else ((n, 1),):
        layout = replace(cfg, num_workers=workers, cpus_per_worker=float(cpus),
                         batch_size=global_batch // workers)
        rate = ray_train(data, layout, augment, work / f"ray_{workers}x{cpus}", epochs)
        layouts[f"{workers}x{cpus}"] = {"images_per_s": round(rate, 1),
                                        "plain_over_ray": round(plain / rate, 3)}
    return {"images": n_train, "image_size": data.image_size, "global_batch": global_batch,
            "epochs_counted": epochs, "plain_images_per_s": round(plain, 1),
            "plain_no_augment_images_per_s": round(plain_no_aug, 1),
            "augment_over_materialised": round(plain / plain_no_aug, 3),
            "compiled_images_per_s": round(compiled, 1), "compiled_over_eager": round(compiled / plain, 3),
            "warmup_epoch_s": {"eager": round(eager_warmup_s, 1), "compiled": round(compiled_warmup_s, 1)},
            "ray": layouts}
