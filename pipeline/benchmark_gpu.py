"""GPU throughput of the project's own training and scoring code against the model's pure
forward/backward on the same GPU (``make bench-gpu``, ``python -m pipeline.benchmark_gpu``).

It needs torch, timm and Albumentations, not Ray or MLflow: it drives the code that each Ray
Train worker and each GPU scoring actor runs (``engine``, ``inference.Predictor``,
``score_inputs.decode_batch``) in one process, so that a GPU machine without the cluster stack
can measure it. What it writes (JSON) goes into ``docs/performance.md`` by ``pipeline benchmark``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.augment import load_policy, policy
from pipeline.config import AugmentConfig, TrainConfig
from pipeline.engine import (ArrayDataset, EpochContext, forward_batch, make_loader, optimizer_step,
                             train_one_epoch)
from pipeline.inference import ModelMeta, Predictor, load_checkpoint, to_tensor
from pipeline.models import create_model, model_info
from pipeline.optim import build_optimizer
from pipeline.regimes import apply_regime
from pipeline.score_inputs import decode_batch, list_inputs


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


def _decoded(part, size: int):
    return decode_batch(part, size)["pixels"]


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
    ctx = multiprocessing.get_context("spawn")
    for workers in decode_workers:
        with ctx.Pool(workers) as pool:
            first: list[float] = []

            def run() -> int:
                t0 = time.perf_counter()
                n = 0
                for px in pool.imap(_decoded_at, [(p, size) for p in parts]):
                    n += len(predictor.predict_resized(px))
                    if len(first) < 1 + repeats and n == len(px):
                        first.append(time.perf_counter() - t0)
                return n
            out[f"from_files_{workers}_decoders"] = round(rate(run, device, repeats), 1)
            out[f"first_batch_s_{workers}_decoders"] = round(statistics.median(first[1:]), 3)
    best = max(v for k, v in out.items() if k.startswith("from_files_"))
    out["best_from_files_over_pure_fp32"] = round(best / out["pure_forward_fp32"], 3)
    return out


def _decoded_at(args) -> np.ndarray:
    return _decoded(*args)


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
    predictor = _predictor(checkpoint, meta, device)
    inputs, _ = list_inputs(str(cells))
    inputs = inputs.iloc[:n]
    with multiprocessing.get_context("spawn").Pool(decode_workers) as pool:
        parts = [(inputs.iloc[i:i + predictor.batch_size], meta.image_size)
                 for i in range(0, n, predictor.batch_size)]
        scored = sum(len(predictor.predict_resized(px)) for px in pool.imap(_decoded_at, parts))
    _sync(device)
    assert scored == n
    return time.perf_counter() - t0


def _predictor(checkpoint: Path | None, meta: ModelMeta, device: torch.device, batch: int = 64) -> Predictor:
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


PARTS = ("precision", "scoring", "training")


def run(cells: Path, checkpoint: Path | None, device: torch.device, smoke: bool = False,
        save: Callable[[dict[str, Any]], None] = lambda result: None,
        parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Every GPU comparison (small and quick with ``smoke``, on whatever device); ``save`` gets
    the results so far after each part (a long run that breaks keeps what it measured)."""
    t0 = time.perf_counter()
    size = load_checkpoint(checkpoint)[1].image_size if checkpoint is not None else 96
    images, labels, classes = labelled_cells(cells, size)
    info = model_info(TrainConfig.model)
    meta = ModelMeta(TrainConfig.model, classes, size, info.mean, info.std)
    cores = len(os.sched_getaffinity(0))
    repeats = 1 if smoke else 3
    result: dict[str, Any] = {
        "machine": {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpu_cores": cores, "torch": torch.__version__, "python": platform.python_version(),
                    "model": meta.model, "image_size": size, "cells": len(images)}}
    predictor = _predictor(checkpoint, meta, device)
    if checkpoint is not None and "precision" in parts:
        result["precision"] = precision(images, predictor, device)
        save(result)
    if "scoring" in parts:
        result["scoring"] = scoring(cells, predictor, device, 192 if smoke else 20000,
                                    (2,) if smoke else tuple(sorted({4, cores - 1})), repeats)
        result["scoring"]["small_job_100_s"] = round(small_job(cells, checkpoint, meta, 16 if smoke else 100,
                                                               device, 2 if smoke else 4), 2)
        save(result)
    if "training" in parts:
        result["training"] = training(images, labels, meta, device, (64,) if smoke else (64, 256),
                                      (0, 2) if smoke else tuple(sorted({0, 4, cores // 2, cores - 1})),
                                      128 if smoke else 6144, repeats, save=lambda part: save(
                                          {**result, "training": part}))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save(result)
    return result


def _rows(values: dict[str, float], labels: dict[str, str], ceiling: float) -> str:
    return "\n".join(f"| {label} | {values[k]:,.0f} | {values[k] / ceiling:.2f} |"
                     for k, label in labels.items() if k in values)


def render(r: dict[str, Any], command: str) -> str:
    """``docs/performance-gpu.md``: every figure from ``r``."""
    m = r["machine"]
    text = f"""# Performance on a GPU

Generated by `{command}` ({r.get('date', '')}); the raw figures are in
[performance-gpu.json](performance-gpu.json). Machine: {m['gpu']}, {m['cpu_cores']} CPU cores,
torch {m['torch']}, Python {m['python']}; {m['model']} at {m['image_size']} px; {m['cells']} real
cells of the sample (cycled where more are needed). Each figure is the median of 3 runs after a warm-up.

This runs the code of a Ray Train worker (`pipeline.engine`: `make_loader`, `train_one_epoch`) and
of a GPU scoring actor (`inference.Predictor`, `score_inputs.decode_batch`) in one process, without
Ray or MLflow: the GPU machine had neither, and no network to install them. What Ray itself costs
is measured on CPU in [performance.md](performance.md). The ceiling of each table is the model's
own speed on this GPU with the data already on it.
"""
    for batch, t in r.get("training", {}).get("by_batch", {}).items():
        pure = max(t.get("pure_step_amp", 0), t.get("pure_step_fp32", 0))
        loaders = {k: f"`train_one_epoch` fed by `make_loader`, {k.split('_')[1]} loader workers, "
                      + ("augmenting" if k.endswith("augment") else "no augmentation")
                   for k in t if k.startswith("loader_")}
        text += f"""
## Training, batch {batch}

| | images/s | / ceiling |
|---|---|---|
{_rows(t, {"pure_step_amp": "ceiling: forward, loss, backward, step on resident batches, AMP",
           "pure_step_fp32": "the same in fp32",
           "epoch_resident_amp": "`train_one_epoch` on resident batches, AMP (its per-step checks)",
           "epoch_resident_fp32": "the same in fp32", **loaders}, pure)}
"""
    if "scoring" in r:
        sc = r["scoring"]
        decoders = {k: f"`Predictor` fed from files by {k.split('_')[2]} decoding processes"
                    for k in sc if k.startswith("from_files_")}
        text += f"""
## Scoring, batch {sc['batch_size']}

| | images/s | / ceiling |
|---|---|---|
{_rows(sc, {"pure_forward_fp32": "ceiling: normalise, forward, softmax on resident batches, fp32",
            "pure_forward_bf16": "the same under bf16 autocast",
            "pure_forward_fp16": "the same under fp16 autocast",
            "predictor_decoded": "`Predictor.predict_resized` on decoded images in host memory", **decoders},
       sc["pure_forward_fp32"])}

Time to the first batch scored: {", ".join(f"{sc[k]} s ({k.split('_')[3]} decoders)" for k in sc
                                            if k.startswith("first_batch_s_"))}. A job of 100 images from
nothing (model load, CUDA start, 4 decoding processes started): {sc['small_job_100_s']} s.
"""
    if "precision" in r:
        pr = r["precision"]
        rows = "\n".join(f"| {k} | {v['max_abs_diff']:.4f} | {v['within_1e-2']:.2%} | {v['same_label']:.2%} |"
                         for k, v in pr.items() if isinstance(v, dict))
        text += f"""
## Autocast against fp32 probabilities

On {pr['cells']} cells, with the trained model:

| autocast | largest difference | cells within 1e-2 | same label |
|---|---|---|---|
{rows}

The bar for lower-precision inference is 99.9 % of cells within 1e-2 with the same label.
"""
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", required=True, help="a folder or zip of cell images, one folder per class")
    p.add_argument("--checkpoint", help="a trained model.pt (the register stage's): also compares "
                                        "fp32 with autocast probabilities")
    p.add_argument("--out", default="docs/performance-gpu.md", help="the page; the JSON goes beside it")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which comparisons")
    p.add_argument("--smoke", action="store_true", help="every part, small, on any device")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device here: the GPU benchmark needs one (--smoke runs it small on CPU)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m pipeline.benchmark_gpu " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(result: dict[str, Any]) -> None:
        result = {**result, "date": date.today().isoformat()}
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.write_text(render(result, command))
        print(f"[{time.strftime('%H:%M:%S')}] saved: {', '.join(result)}", flush=True)
    result = run(Path(args.cells), Path(args.checkpoint) if args.checkpoint else None, device,
                 args.smoke, save, tuple(args.parts))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
