"""GPU throughput of the project's own training and scoring code against the model's pure
forward/backward on the same GPU (``make bench-gpu``, ``python -m pipeline.bench.gpu``).

It needs torch, timm and Albumentations, not Ray or MLflow: it drives the code that each Ray
Train worker and each GPU scoring actor runs (``engine``, ``inference.Predictor``,
``score_inputs.decode_batch``) in one process, so that a GPU machine without the cluster stack
can measure it. It writes ``reports/performance-gpu.md`` and the JSON beside it (``--out docs``
publishes them); ``pipeline benchmark`` links that page from its own when the JSON lies beside it.
What each part measures is in :mod:`pipeline.bench.gpu_measure`, the page in
:mod:`pipeline.bench.gpu_page`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from pipeline.bench import REPORTS, gpu_stages, page_path
from pipeline.bench.gpu_measure import (
    labelled_cells,
    load_predictor,
    precision,
    scoring,
    small_job,
    training,
)
from pipeline.bench.gpu_page import render
from pipeline.cli import command_line
from pipeline.config import TrainConfig
from pipeline.models import model_info
from pipeline.serving.inference import ModelMeta, load_checkpoint

PARTS = ("stages", "precision", "scoring", "training")
PAGE = "performance-gpu.md"


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
    predictor = load_predictor(checkpoint, meta, device)
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


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline.bench.gpu``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", help="an archive in the official layout (the sample zip): the real stages "
                                     "run on it first, and its cells and trained model feed the other parts")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="params of the stages' project (train.epochs=1); the GPU settings are set already")
    p.add_argument("--work", default=None, help="where the stages' project goes (default: a new temp folder)")
    p.add_argument("--cells", help="a folder or zip of cell images, one folder per class (default: --archive)")
    p.add_argument("--checkpoint", help="a trained model.pt (the register stage's): also compares "
                                        "fp32 with autocast probabilities")
    p.add_argument("--out", default=str(REPORTS / PAGE),
                   help=f"the page, or a folder for {PAGE} (default: %(default)s; --out docs publishes "
                        "it); the JSON goes beside it")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which comparisons")
    p.add_argument("--smoke", action="store_true", help="every part, small, on any device")
    return p


def saver(out: Path, command: str) -> Callable[[dict[str, Any]], None]:
    """What :func:`run` saves with: the results so far, dated, as ``out``'s JSON and page."""
    def save(result: dict[str, Any]) -> None:
        result = {**result, "date": date.today().isoformat()}
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.write_text(render(result, command))
        print(f"[{time.strftime('%H:%M:%S')}] saved: {', '.join(result)}", flush=True)
    return save


def stage_params(assignments: list[str], device: torch.device) -> dict[str, Any]:
    """The stages' params: the GPU settings (on a GPU), then ``KEY=VALUE`` (YAML values)."""
    from pipeline.project import deep_update

    gpu = device.type == "cuda"
    params: dict[str, Any] = {"train": {"use_gpu": gpu, "num_workers": "auto"}, "score": {"use_gpu": gpu}}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. train.epochs=1")
        node: dict[str, Any] = {}
        leaf = node
        *parents, last = key.split(".")
        for name in parents:
            leaf = leaf.setdefault(name, {})
        leaf[last] = yaml.safe_load(value)
        params = deep_update(params, node)
    return params


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device here: the GPU benchmark needs one (--smoke runs it small on CPU)")
    parts = tuple(args.parts) if args.archive else tuple(p for p in args.parts if p != "stages")
    if not (args.archive or args.cells):
        raise SystemExit("give --archive (the real stages run on it first) or --cells")
    out = page_path(args.out, PAGE)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = command_line("python -m pipeline.bench.gpu", argv if argv is not None else sys.argv[1:])
    save, stages, checkpoint = saver(out, command), {}, args.checkpoint
    if "stages" in parts:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
        stages, project = gpu_stages.run(Path(args.archive), work, stage_params(args.set, device))
        save({"machine": {}, "stages": stages})
        checkpoint = checkpoint or str(project / "models" / "model.pt")

    def with_stages(result: dict[str, Any]) -> dict[str, Any]:
        return {**result, **({"stages": stages} if stages else {})}

    result = run(Path(args.cells or args.archive), Path(checkpoint) if checkpoint else None, device,
                 args.smoke, lambda r: save(with_stages(r)), parts)
    print(json.dumps(with_stages(result), indent=1))


if __name__ == "__main__":
    main()
