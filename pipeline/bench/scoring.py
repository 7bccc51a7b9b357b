"""Throughput measurements, each against a plain baseline in the same process run.

Every comparison warms up first and reports the median of ``repeats`` runs. Scoring:
``score`` (the pipeline, defaults) against a plain program on the whole machine (a Python
process pool decoding and resizing while torch runs the forward pass with the best thread
count), both from the same PNG files to probabilities. Training: Ray Train against the
same epoch code in a plain loop, and augmentation against pre-materialised images.
prepare: one process against one per core. :mod:`pipeline.bench.report` runs them all and
writes ``docs/performance.md``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.data.prepared import PreparedData


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def median_of(repeats: int, run: Callable[[], float]) -> tuple[float, list[float]]:
    """Median and all values of ``run()`` over ``repeats`` runs."""
    values = [run() for _ in range(repeats)]
    return statistics.median(values), values


def write_images(prepared: Path, n: int, out: Path) -> list[Path]:
    """``n`` PNG files cycled from the prepared test split's original images."""
    data = PreparedData(prepared)
    paths = data.rows("test")["path"].tolist()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        dest = out / f"{i:06d}.png"
        dest.write_bytes((data.images_dir / paths[i % len(paths)]).read_bytes())
        files.append(dest)
    return files


def load_predictor(model_uri: str):
    """The model behind ``model_uri`` as the pipeline's Predictor (fp32, channels_last)."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor


def _decode(args: tuple[str, int]) -> np.ndarray:
    from pipeline.data.images import load_rgb, resize

    path, size = args
    return resize(load_rgb(Path(path).read_bytes()), size)


def plain_scoring(predictor, files: list[Path], batch_size: int, threads: int, workers: int) -> float:
    """Images/s of a plain program: a forked pool decodes and resizes, torch predicts."""
    size = predictor.meta.image_size
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        batch = []
        for img in pool.imap(_decode, [(str(f), size) for f in files], chunksize=32):
            batch.append(img)
            if len(batch) == batch_size:
                predictor.predict_resized(np.stack(batch))
                batch = []
        if batch:
            predictor.predict_resized(np.stack(batch))
    return len(files) / (time.perf_counter() - t0)


def best_plain_layout(predictor, files: list[Path], batch_size: int) -> dict[str, Any]:
    """The fastest (torch threads, decoding processes) of the plain program on ``files``."""
    n = cores()
    layouts = sorted({(t, w) for t in range(1, n + 1) for w in {1, max(1, n - 1), n}})
    rates = {layout: plain_scoring(predictor, files, batch_size, *layout) for layout in layouts}
    (threads, workers), rate = max(rates.items(), key=lambda kv: kv[1])
    return {"threads": threads, "workers": workers, "tried": {f"{t}x{w}": round(r, 1)
                                                              for (t, w), r in rates.items()}}


def scoring(model_uri: str, prepared: Path, n_images: int, batch_size: int, repeats: int,
            work: Path) -> dict[str, Any]:
    """``score`` with default settings vs the plain end-to-end program, same files and batch."""
    from pipeline.config import ScoreConfig
    from pipeline.serving.score import score

    files = write_images(prepared, n_images, work / "cells")
    predictor = load_predictor(model_uri)
    best = best_plain_layout(predictor, files[:min(len(files), 1000)], batch_size)
    plain, plain_runs = median_of(repeats, lambda: plain_scoring(predictor, files, batch_size,
                                                                 best["threads"], best["workers"]))
    torch.set_num_threads(cores())
    cfg = ScoreConfig(input=str(work / "cells"), batch_size=batch_size)
    runs = [score(cfg, model_uri, work / "scores.parquet") for _ in range(repeats + 1)]
    pipe = statistics.median(r.images_per_s for r in runs[1:])  # the first starts Ray: reported apart
    actors = {}  # scaling with the actor count, on a quarter of the images (one run each)
    write_images(prepared, max(n_images // 4, 1), work / "quarter")
    for k in sorted({1, 2}):
        c = ScoreConfig(input=str(work / "quarter"), batch_size=batch_size, concurrency=k,
                        cpus_per_actor=max(0.5, (cores() - 1) / k), local_max_images=0)
        actors[k] = round(score(c, model_uri, work / f"scores_{k}.parquet").images_per_s, 1)
    return {"images": n_images, "batch_size": batch_size, "plain_images_per_s": round(plain, 1),
            "plain_runs": [round(v, 1) for v in plain_runs], "plain_layout": best,
            "score_images_per_s": round(pipe, 1), "score_runs": [round(r.images_per_s, 1) for r in runs[1:]],
            "score_first_run_images_per_s": round(runs[0].images_per_s, 1),
            "score_time_to_first_row_s": round(statistics.median(r.first_row_s for r in runs[1:]), 2),
            "actors_images": max(n_images // 4, 1), "actors_images_per_s": actors,
            "ratio": round(pipe / plain, 3)}


def small_job(model_uri: str, prepared: Path, sizes: tuple[int, ...], work: Path) -> dict[str, Any]:
    """Wall time of scoring each of ``sizes`` images in a fresh process: Ray Data vs in-process."""
    out: dict[str, Any] = {}
    for n in sizes:
        write_images(prepared, n, work / f"small{n}")
        out[str(n)] = {}
        for name, local in (("ray", 0), ("in_process", n)):
            code = ("import json,sys,time;t=time.perf_counter();from pipeline.config import ScoreConfig;"
                    "from pipeline.serving.score import score;"
                    f"r=score(ScoreConfig(input={str(work / f'small{n}')!r},local_max_images={local}),"
                    f"{model_uri!r},{str(work / f'small_{name}.parquet')!r});"
                    "print(json.dumps({'wall_s':time.perf_counter()-t,'first_row_s':r.first_row_s,"
                    "'engine':r.engine}))")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            out[str(n)][name] = {"process_wall_s": round(time.perf_counter() - t0, 2),
                                 "score_call_s": round(result["wall_s"], 2),
                                 "first_row_s": round(result["first_row_s"], 2), "engine": result["engine"]}
    return out


def bf16_check(model_uri: str, prepared: Path, repeats: int) -> dict[str, Any]:
    """bf16 autocast against fp32 on the test cells: agreement and forward speed."""
    predictor = load_predictor(model_uri)
    images = np.asarray(PreparedData(prepared).split("test").images)
    torch.set_num_threads(cores())

    def run(bf16: bool) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probs = predictor.predict_resized(images)
        return probs, len(images) / (time.perf_counter() - t0)

    run(False), run(True)  # warm-up
    fp32 = [run(False) for _ in range(repeats)]
    bf16 = [run(True) for _ in range(repeats)]
    p32, p16 = fp32[0][0], bf16[0][0]
    diff = np.abs(p32 - p16).max(axis=1)
    agree = (diff <= 1e-2) & (p32.argmax(1) == p16.argmax(1))
    return {"cells": len(images), "max_abs_diff": round(float(diff.max()), 5),
            "share_within_1e-2_same_label": round(float(agree.mean()), 5),
            "fp32_images_per_s": round(statistics.median(r[1] for r in fp32), 1),
            "bf16_images_per_s": round(statistics.median(r[1] for r in bf16), 1)}


def prepare_speedup(archive: Path, work: Path, repeats: int) -> dict[str, Any]:
    """``prepare`` in one process against one per core; both outputs compared byte for byte."""
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare

    def once(workers: int) -> float:
        out = work / f"prepared_{workers}"
        t0 = time.perf_counter()
        prepare(archive, out, PrepareConfig(workers=workers), "malaria")
        return time.perf_counter() - t0

    serial, serial_runs = median_of(repeats, lambda: once(1))
    parallel, parallel_runs = median_of(repeats, lambda: once(0))
    same = _tree_digest(work / "prepared_1") == _tree_digest(work / "prepared_0")
    return {"serial_s": round(serial, 2), "parallel_s": round(parallel, 2), "workers": cores(),
            "serial_runs": [round(v, 2) for v in serial_runs],
            "parallel_runs": [round(v, 2) for v in parallel_runs],
            "speedup": round(serial / parallel, 2), "byte_identical": same}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
