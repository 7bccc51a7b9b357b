"""``pipeline benchmark`` (``make bench``): every performance comparison in one process run,
written to ``reports/performance.md`` and ``reports/performance.json`` (``--out docs``
publishes them), ratios printed last.

The end-to-end part scaffolds a project on the archive, runs ``dvc repro`` (each stage
records its wall time and peak memory in ``logs/<stage>.stats.json``), then a no-op
``dvc repro``. ``--smoke`` runs every part small (the CI test), not for the figures.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from pipeline.bench import page_path
from pipeline.bench import scoring as benchmark
from pipeline.bench import training as benchmark_train
from pipeline.bench.page import render
from pipeline.config import AugmentConfig, TrainConfig
from pipeline.files import write_json
from pipeline.project import STAGES

PAGE = "performance.md"


@dataclass(frozen=True)
class BenchSize:
    """How big each part runs: the full figures, or a smoke run that only proves it works."""

    score_images: int = 20000  # without --score-input: the test cells, cycled to this many files
    screen_images: int = 2000  # every plain layout runs on this many; the 3 fastest on all
    small_job_sizes: tuple[int, ...] = (100, 1000, 5000)
    train_images: int = 1024
    train_epochs: int = 3
    repeats: int = 3
    end_to_end: bool = True
    both_layouts: bool = True  # Ray Train at 1 worker x all cores too, not only all cores x 1 worker


SMOKE = BenchSize(score_images=96, screen_images=32, small_job_sizes=(16,), train_images=128, train_epochs=1, repeats=1,
                  end_to_end=False, both_layouts=False)


def machine() -> dict[str, Any]:
    """CPU model, cores, GPU and library versions."""
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cores": benchmark.cores(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()}


def end_to_end(archive: Path, sha256: str, work: Path) -> dict[str, Any]:
    """``dvc repro`` of a fresh project on ``archive``: per-stage wall time and peak memory."""
    from pipeline.project import dvc_env, scaffold

    project = scaffold(work / "project", {"download": {"sources": {"malaria": {
        "url": str(archive.resolve()), "sha256": sha256}}}}, git=True)
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "--quiet"], cwd=project, env=dvc_env(), check=True,
                   capture_output=True)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "--quiet"], cwd=project, env=dvc_env(), check=True,
                   capture_output=True)
    noop = time.perf_counter() - t0
    stages = {s: json.loads((project / "logs" / f"{s}.stats.json").read_text()) for s in STAGES}
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    train = json.loads((project / "metrics" / "train.json").read_text())
    test = {k: metrics[k] for k in metrics if isinstance(metrics[k], float) and k.split("_ci_")[0] in
            ("accuracy", "roc_auc", "sensitivity", "specificity")}
    return {"repro_s": round(total, 1), "noop_repro_s": round(noop, 2), "stages": stages,
            "test_accuracy": metrics.get("accuracy"), "test_roc_auc": metrics.get("roc_auc"),
            "test": test, "best_epoch": train.get("best_epoch")}


PARTS = ("scoring", "small_job", "bf16", "training", "prepare", "end_to_end")


def run_all(prepared: Path, model_uri: str, archive: Path, sha256: str, work: Path,
            size: BenchSize, train_cfg: TrainConfig, augment: AugmentConfig,
            score_input: Path | None = None, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """The comparisons in ``parts``, in this process; the results as one dict. Scoring reads
    ``score_input`` (a zip or folder of real cells), else the test cells cycled to
    ``size.score_images`` files."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"date": date.today().isoformat(), "machine": machine(),
                           "size": size.__dict__}
    if "scoring" in parts:
        source = score_input or benchmark.write_images(prepared, size.score_images, work / "cells")[0].parent
        out["scoring"] = benchmark.scoring(model_uri, source, size.repeats, work / "scoring",
                                           screen=size.screen_images)
    if "small_job" in parts:
        out["small_job"] = benchmark.small_job(model_uri, prepared, size.small_job_sizes, work / "small")
    if "bf16" in parts:
        out["bf16"] = benchmark.bf16_check(model_uri, prepared, size.repeats)
    if "training" in parts:
        out["training"] = benchmark_train.training(prepared, train_cfg, augment, size.train_images,
                                                   size.train_epochs, work / "training", size.both_layouts)
    if "prepare" in parts:
        out["prepare"] = benchmark.prepare_speedup(archive, work / "prepare", size.repeats)
    if "end_to_end" in parts and size.end_to_end:
        out["end_to_end"] = end_to_end(archive, sha256, work / "e2e")
    return out


def merge_parts(out: str | Path, results: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """The JSON already at ``out`` with ``parts`` replaced by ``results``' (each part keeps the
    date it was measured on, in ``measured``)."""
    old_json = page_path(out, PAGE).with_suffix(".json")
    if not old_json.exists():
        raise SystemExit(f"--only needs the earlier figures at {old_json}: run the whole benchmark first")
    merged = json.loads(old_json.read_text())
    measured = merged.get("measured") or {p: merged["date"] for p in PARTS if p in merged}
    for part in parts:
        merged[part], measured[part] = results[part], results["date"]
    return {**merged, "measured": measured, "date": results["date"], "machine": results["machine"]}


def write(results: dict[str, Any], out: str | Path, command: str) -> Path:
    """The page (tables) and the JSON beside it; ``out`` is the page or a folder for
    ``performance.md``. Returns the page's path."""
    markdown = page_path(out, PAGE)
    write_json(markdown.with_suffix(".json"), results)
    gpu = markdown.with_name("performance-gpu.json")  # from `python -m pipeline.bench.gpu`
    markdown.write_text(render(results, command, json.loads(gpu.read_text()) if gpu.exists() else None))
    return markdown


