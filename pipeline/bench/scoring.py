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
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
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


@dataclass(frozen=True)
class Layout:
    """One way to lay the plain program out on the machine."""

    decode: str  # "processes" (a forked pool) or "threads"
    decoders: int  # decoding processes or threads
    torch_threads: int  # the forward pass's threads, in the main process
    batch: int

    @property
    def name(self) -> str:
        return f"{self.decode} x{self.decoders}, torch x{self.torch_threads}, batch {self.batch}"


def layouts(n_cores: int) -> list[Layout]:
    """Every layout the benchmark tries: decoding in processes or threads, 1 or all cores of
    decoders, 1 or 2 torch threads, batch 64/128/256."""
    return [Layout(decode, decoders, threads, batch)
            for decode in ("processes", "threads") for decoders in sorted({1, n_cores})
            for threads in sorted({1, min(2, n_cores)}) for batch in (64, 128, 256)]


def plain_scoring(predictor, inputs: pd.DataFrame, layout: Layout) -> float:
    """Images/s of a plain program over ``inputs`` (``path``/``container`` rows): the project's
    ``decode_batch`` in a pool, a few batches ahead, and the predictor's forward pass in this
    process (probabilities only: no out-of-distribution score or its appearance statistics,
    no output file; the input checks stay, as in the project's decoding)."""
    from pipeline.serving.score_inputs import decoded_batches

    torch.set_num_threads(layout.torch_threads)
    predictor.batch_size = layout.batch
    t0 = time.perf_counter()
    pool = (ProcessPoolExecutor(layout.decoders, mp_context=multiprocessing.get_context("fork"))
            if layout.decode == "processes" else ThreadPoolExecutor(layout.decoders))
    with pool:
        for batch in decoded_batches(inputs, predictor.meta.image_size, predictor.limits, layout.batch,
                                     pool, ahead=2 * layout.decoders, stats=False):
            predictor.predict_resized(batch["pixels"])
    return len(inputs) / (time.perf_counter() - t0)


def best_plain(predictor, inputs: pd.DataFrame, screen: int, finalists: int,
               repeats: int) -> dict[str, Any]:
    """Every layout on the first ``screen`` inputs, then the ``finalists`` fastest on all of
    them (median of ``repeats``); the best finalist is the baseline."""
    first = inputs.iloc[:screen]
    tried = {layout: plain_scoring(predictor, first, layout) for layout in layouts(cores())}
    top = sorted(tried, key=tried.get, reverse=True)[:finalists]
    full = {layout: median_of(repeats, lambda: plain_scoring(predictor, inputs, layout)) for layout in top}
    best = max(full, key=lambda layout: full[layout][0])
    return {"layout": best.name, "images_per_s": round(full[best][0], 1),
            "runs": [round(v, 1) for v in full[best][1]],
            "screened_on": len(first), "screened": {k.name: round(v, 1) for k, v in tried.items()},
            "finalists": {k.name: round(v[0], 1) for k, v in full.items()}}


def score_cold(model_uri: str, source: str, work: Path) -> dict[str, float]:
    """``pipeline score`` with its defaults (TTA off, as the plain program) in a fresh process:
    wall time, Ray's start included."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "score", "--input", source, "--model",
                           model_uri, "--output", str(work / "cold.parquet"), "--no-tta"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pipeline score failed:\n{proc.stderr[-2000:]}")
    return {"process_wall_s": round(time.perf_counter() - t0, 2)}


def scoring(model_uri: str, source: Path, repeats: int, work: Path, screen: int = 2000,
            finalists: int = 3) -> dict[str, Any]:
    """``score`` with its defaults against the best plain layout, on the same images (a zip or
    folder of real cells): each score run after the first has Ray up; start-up apart. TTA is
    off in both: the comparison is of the engines, one forward pass an image."""
    from pipeline.config import ScoreConfig
    from pipeline.serving.score import score
    from pipeline.serving.score_inputs import list_inputs

    inputs, _ = list_inputs(source)
    work.mkdir(parents=True, exist_ok=True)
    predictor = load_predictor(model_uri)
    plain = best_plain(predictor, inputs, min(screen, len(inputs)), finalists, repeats)
    torch.set_num_threads(cores())
    cfg = ScoreConfig(input=str(source), tta=False)
    runs = [score(cfg, model_uri, work / "scores.parquet") for _ in range(repeats + 1)]
    pipe = statistics.median(r.images_per_s for r in runs[1:])  # the first warms up: apart
    ray_data = score(replace(cfg, local_max_images=0), model_uri, work / "scores_ray.parquet")
    cold = score_cold(model_uri, str(source), work)
    return {"images": len(inputs), "input": source.name, "plain": plain,
            "plain_images_per_s": plain["images_per_s"], "score_engine": runs[-1].engine,
            "score_images_per_s": round(pipe, 1), "score_runs": [round(r.images_per_s, 1) for r in runs[1:]],
            "score_first_run_images_per_s": round(runs[0].images_per_s, 1),
            "score_time_to_first_row_s": round(statistics.median(r.first_row_s for r in runs[1:]), 2),
            "score_cold_process_s": cold["process_wall_s"],
            "ray_data_images_per_s": round(ray_data.images_per_s, 1),
            "ratio": round(pipe / plain["images_per_s"], 3)}


def small_job(model_uri: str, prepared: Path, sizes: tuple[int, ...], work: Path) -> dict[str, Any]:
    """Wall time of scoring each of ``sizes`` images in a fresh process: Ray Data vs in-process."""
    out: dict[str, Any] = {}
    for n in sizes:
        write_images(prepared, n, work / f"small{n}")
        out[str(n)] = {}
        for name, local in (("ray", 0), ("in_process", n)):
            code = ("import json,sys,time;t=time.perf_counter();from pipeline.config import ScoreConfig;"
                    "from pipeline.serving.score import score;"
                    f"r=score(ScoreConfig(input={str(work / f'small{n}')!r},local_max_images={local},tta=False),"
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
