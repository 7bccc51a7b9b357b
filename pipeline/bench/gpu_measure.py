"""What :mod:`pipeline.bench.gpu` measures on the GPU: the project's training step and epoch,
its scoring actor's forward path from files, autocast against fp32, and a small job from
nothing, each against the model's pure forward/backward with the data already on the device."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.data.augment import load_policy, policy
from pipeline.models import create_model
from pipeline.serving.inference import ModelMeta, Predictor, load_checkpoint, to_tensor
from pipeline.serving.score_inputs import decode_batch, list_inputs
from pipeline.training.engine import (
    ArrayDataset,
    EpochContext,
    forward_batch,
    make_loader,
    optimizer_step,
    train_one_epoch,
)
from pipeline.training.optim import build_optimizer
from pipeline.training.regimes import apply_regime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Median images/s of ``fn`` (returns the images it handled) after one warm-up call."""
    fn()
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        n = fn()
        _sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _training_parts(cfg: TrainConfig, meta: ModelMeta, device: torch.device, amp: bool):
    """Model (channels_last, on ``device``), optimiser and epoch context, as a worker builds them."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, len(meta.class_names), pretrained=False)
    plan = apply_regime(model, cfg.regime, cfg.lr, cfg.top_blocks, cfg.backbone_lr_factor)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, plan.param_groups)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    ctx = EpochContext(model, torch.nn.CrossEntropyLoss(), meta, device, True, scaler, 0)
    return ctx, optimizer


def _resident_batches(images: np.ndarray, labels: np.ndarray, batch: int, steps: int,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` uint8 batches already on the device (cycling through the images)."""
    idx = np.arange(batch * steps) % len(images)
    x = torch.from_numpy(images[idx]).to(device)
    y = torch.from_numpy(labels[idx]).long().to(device)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(idx), batch)]


def pure_train_step_rate(ctx: EpochContext, optimizer, batches, device, repeats: int) -> float:
    """The ceiling: forward, loss, backward and optimiser step on device-resident batches, with
    no host work or synchronisation between steps."""
    def run() -> int:
        for x, y in batches:
            optimizer_step(ctx, optimizer, forward_batch(ctx, x, y)[1])
        return sum(len(y) for _, y in batches)
    return rate(run, device, repeats)


def training(images: np.ndarray, labels: np.ndarray, meta: ModelMeta, device: torch.device,
             batches: tuple[int, ...], loader_workers: tuple[int, ...], epoch_images: int,
             repeats: int, save: Callable[[dict[str, Any]], None] = lambda part: None) -> dict[str, Any]:
    """Images/s of the pure step, of ``train_one_epoch`` on resident batches, and of
    ``train_one_epoch`` fed by ``make_loader`` (augmenting, at each loader worker count)."""
    cfg = TrainConfig()
    transform = load_policy(policy(AugmentConfig(), meta.image_size), cfg.seed)
    out: dict[str, Any] = {"epoch_images": epoch_images, "by_batch": {}}
    for batch in batches:
        steps = max(1, epoch_images // batch)
        row: dict[str, Any] = {}
        for amp in ((True, False) if device.type == "cuda" else (False,)):
            ctx, opt = _training_parts(cfg, meta, device, amp)
            resident = _resident_batches(images, labels, batch, steps, device)
            key = "amp" if amp else "fp32"
            row[f"pure_step_{key}"] = round(pure_train_step_rate(ctx, opt, resident, device, repeats), 1)
            row[f"epoch_resident_{key}"] = round(rate(
                lambda: train_one_epoch(ctx, resident, opt, 0)[2], device, repeats), 1)
            out["by_batch"][str(batch)] = row
            save(out)
        ctx, opt = _training_parts(cfg, meta, device, amp=True)
        n = steps * batch
        for workers in loader_workers:
            for augment in (True, False):
                loader = make_loader(ArrayDataset(images[np.arange(n) % len(images)],
                                                  labels[np.arange(n) % len(images)],
                                                  transform if augment else None),
                                     batch, device, workers, shuffle=True, drop_last=True)
                key = f"loader_{workers}_{'augment' if augment else 'materialised'}"
                row[key] = round(rate(lambda: train_one_epoch(ctx, loader, opt, 0)[2], device, repeats), 1)
                loader = None  # its worker processes end here
                save(out)
        best = max(row[k] for k in row if k.endswith("_augment"))
        row["best_augmenting_over_pure"] = round(best / row["pure_step_amp" if device.type == "cuda"
                                                           else "pure_step_fp32"], 3)
        out["by_batch"][str(batch)] = row
    return out


def _forward_rate(model, meta: ModelMeta, batches, device, dtype: torch.dtype | None, repeats: int) -> float:
    """Pure inference: normalise + forward + softmax of device-resident uint8 batches."""
    @torch.inference_mode()
    def run() -> int:
        for x, _ in batches:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                torch.softmax(model(to_tensor(x, meta, device)), 1)
        return sum(len(x) for x, _ in batches)
    return rate(run, device, repeats)


def _decoder(size: int) -> Callable[[Any], dict[str, np.ndarray]]:
    """``decode_batch`` at ``size``, without the reject statistics: picklable to a spawned
    decoding process, which then imports only its light module."""
    return partial(decode_batch, size=size, stats=False)


def _decoded(part, size: int) -> np.ndarray:
    return _decoder(size)(part)["pixels"]


def scoring(cells: Path, predictor: Predictor, device: torch.device, images: int,
            decode_workers: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Predictor (the scoring actor's forward path) from files: decode in a process pool while
    the predictor scores, against the model's pure forward on device-resident batches."""
    inputs, _ = list_inputs(str(cells))
    inputs = inputs.iloc[np.arange(images) % len(inputs)].reset_index(drop=True)
    size, batch = predictor.meta.image_size, predictor.batch_size
    parts = [inputs.iloc[i:i + batch] for i in range(0, len(inputs), batch)]
    pixels = np.concatenate([_decoded(p, size) for p in parts[:8]])
    labels = np.zeros(len(pixels), np.int64)
    out: dict[str, Any] = {"images": images, "batch_size": batch}
    resident = _resident_batches(pixels, labels, batch, max(1, 4096 // batch), device)
    dtypes = {"fp32": None}
    if device.type == "cuda":
        dtypes.update({"bf16": torch.bfloat16, "fp16": torch.float16})
    for name, dtype in dtypes.items():
        out[f"pure_forward_{name}"] = round(_forward_rate(predictor.model, predictor.meta, resident, device,
                                                          dtype, repeats), 1)
    out["predictor_decoded"] = round(rate(lambda: len(predictor.predict_resized(pixels)), device, repeats), 1)
    for workers in decode_workers:
        with _decoders(workers) as pool:
            first: list[float] = []

            def run() -> int:
                t0 = time.perf_counter()
                n = 0
                for decoded in pool.map(_decoder(size), parts):
                    px = decoded["pixels"]
                    n += len(predictor.predict_resized(px))
                    if len(first) < 1 + repeats and n == len(px):
                        first.append(time.perf_counter() - t0)
                return n
            out[f"from_files_{workers}_decoders"] = round(rate(run, device, repeats), 1)
            out[f"first_batch_s_{workers}_decoders"] = round(statistics.median(first[1:]), 3)
    best = max(v for k, v in out.items() if k.startswith("from_files_"))
    out["best_from_files_over_pure_fp32"] = round(best / out["pure_forward_fp32"], 3)
    return out


def _decoders(workers: int) -> ProcessPoolExecutor:
    """Decoding processes (spawned: the parent holds CUDA and torch threads). An executor, not a
    ``multiprocessing.Pool``: a worker that dies raises ``BrokenProcessPool`` instead of leaving
    the caller waiting for its results forever (seen once in a CPU smoke run). They run
    :func:`_decoder`, so each imports ``decode_batch``'s light module, not this one's torch and
    Albumentations (seconds a process; a minute on two busy cores)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def precision(pixels: np.ndarray, predictor: Predictor, device: torch.device) -> dict[str, Any]:
    """fp32 against autocast probabilities on decoded cells: the largest difference, the share
    within 1e-2 and the share with the same label."""
    x = torch.from_numpy(pixels)
    out: dict[str, Any] = {"cells": len(pixels)}
    with torch.inference_mode():
        def probs(dtype):
            chunks = []
            for i in range(0, len(x), 256):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = predictor.model(to_tensor(x[i:i + 256], predictor.meta, device))
                chunks.append(torch.softmax(logits.float(), 1).cpu().numpy())
            return np.concatenate(chunks)
        ref = probs(None)
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if device.type != "cuda" and dtype == torch.float16:
                continue
            p = probs(dtype)
            diff = np.abs(p - ref).max(1)
            out[name] = {"max_abs_diff": float(diff.max()), "within_1e-2": float((diff <= 1e-2).mean()),
                         "same_label": float((p.argmax(1) == ref.argmax(1)).mean())}
    return out


def small_job(cells: Path, checkpoint: Path | None, meta: ModelMeta, n: int, device: torch.device,
              decode_workers: int) -> float:
    """Seconds to score ``n`` images from files from nothing: model load, decoders, forward."""
    t0 = time.perf_counter()
    predictor = load_predictor(checkpoint, meta, device)
    inputs, _ = list_inputs(str(cells))
    inputs = inputs.iloc[:n]
    with _decoders(decode_workers) as pool:
        parts = [inputs.iloc[i:i + predictor.batch_size] for i in range(0, n, predictor.batch_size)]
        decoded = pool.map(_decoder(meta.image_size), parts)
        scored = sum(len(predictor.predict_resized(d["pixels"])) for d in decoded)
    _sync(device)
    assert scored == n
    return time.perf_counter() - t0


def load_predictor(checkpoint: Path | None, meta: ModelMeta, device: torch.device, batch: int = 64) -> Predictor:
    """The scoring actor's predictor: the checkpoint's model, or an untrained one shaped by ``meta``."""
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, device=str(device))
    else:
        model = create_model(meta.model, len(meta.class_names), pretrained=False)
    return Predictor(model, meta, batch_size=batch, device=str(device))


def labelled_cells(cells: Path, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every image of ``cells`` decoded at ``size``, labelled by its folder's name."""
    inputs, _ = list_inputs(str(cells))
    folders = inputs["path"].map(lambda p: Path(p).parent.name)
    classes = tuple(sorted(folders.unique()))
    return _decoded(inputs, size), folders.map(classes.index).to_numpy(np.int64), classes
