"""The real pipeline on a GPU machine: a fresh project on an archive, and its DVC stages' own
commands run in order (``download`` ... ``train`` -> ``evaluate`` -> ``register`` -> ``score``),
then ``pipeline score`` over the whole archive with the new champion.

Each stage's command is read from the project's ``dvc.yaml`` (``${...}`` from its
``params.yaml``), so what runs is the stage itself, not a copy of its loop; DVC is not needed
(a GPU machine without a network may lack it). A sampler reads ``nvidia-smi`` twice a second
while each stage runs: GPU busy share and memory. :mod:`pipeline.bench.gpu` puts these figures
beside the model's own step rate and the plain GPU scoring program.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.project import STAGES


class GpuSampler:
    """``nvidia-smi`` in the background while a block runs: busy % and memory used (MiB); no
    figures where there is no ``nvidia-smi`` (a CPU smoke run)."""

    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-lms", "500"]

    def __enter__(self) -> "GpuSampler":
        self.samples: list[tuple[float, float]] = []
        try:
            self._proc = subprocess.Popen(self.QUERY, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True)
        except FileNotFoundError:
            self._proc = None
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            busy, memory = (float(v) for v in line.split(",")[:2])
            self.samples.append((busy, memory))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        busy = [b for b, _ in self.samples]
        return {"gpu_busy_pct_mean": round(sum(busy) / len(busy), 1), "gpu_busy_pct_max": max(busy),
                "gpu_memory_mib_max": max(m for _, m in self.samples), "gpu_samples": len(busy)}


def stage_commands(project: Path) -> list[tuple[str, str]]:
    """(stage, command) of ``STAGES`` from the project's ``dvc.yaml``, its ``${a.b}`` resolved
    from ``params.yaml``."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((project / "params.yaml").read_text())

    def value(match: re.Match) -> str:
        node: Any = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return [(name, re.sub(r"\$\{([^}]+)\}", value, stages[name]["cmd"])) for name in STAGES]


def run_stage(project: Path, name: str, command: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    """One stage's command in ``project``: wall time, GPU figures, the stage's own stats and
    its last line of output."""
    t0 = time.perf_counter()
    with GpuSampler() as gpu, log.open("w") as out:
        proc = subprocess.run(shlex.split(command), cwd=project, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); its output ends:\n{tail}")
    stats = project / "logs" / f"{name}.stats.json"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return {"wall_s": round(wall, 2), **gpu.summary(),
            **(json.loads(stats.read_text()) if stats.exists() else {}),
            "last_line": lines[-1][:300] if lines else ""}


def run(archive: Path, work: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Every stage on ``archive`` in a fresh project under ``work``, then ``pipeline score`` of
    the whole archive; the figures, and the project."""
    from pipeline.handoffs import RegisterHandoff, read_handoff
    from pipeline.project import deep_update, dvc_env, scaffold

    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    source = {"download": {"sources": {"malaria": {"url": str(archive.resolve()), "sha256": sha256}}}}
    project = scaffold(work / "project", deep_update(source, overrides))
    env = {**dvc_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project.resolve() / 'mlflow.db'}"}
    (project / "logs").mkdir(exist_ok=True)
    stages = {}
    for name, command in stage_commands(project):
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {command}", flush=True)
        stages[name] = run_stage(project, name, command, env, project / "logs" / f"{name}.bench.log")
    uri = read_handoff(RegisterHandoff, project / "models" / "register.json").alias_uri()
    whole = [sys.executable, "-m", "pipeline", "score", "--model", uri, "--input", str(archive.resolve()),
             "--output", "data/scores/archive.parquet", *(["--gpu"] if overrides.get("score", {}).get("use_gpu") else [])]
    stages["score_archive"] = run_stage(project, "score_archive", shlex.join(whole), env,
                                        project / "logs" / "score_archive.bench.log")
    return {"stages": stages, **_figures(project, stages)}, project


def _figures(project: Path, stages: dict[str, Any]) -> dict[str, Any]:
    """Training images/s (epochs after the first, and the first), test accuracy and AUC, and
    the scoring rates the stages printed."""
    import pandas as pd

    history = pd.read_csv(project / "plots" / "train" / "history.csv")
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    rate = r"([0-9.]+) img/s"
    scored = {k: float(m.group(1)) for k in ("score", "score_archive")
              if (m := re.search(rate, (project / "logs" / f"{k}.bench.log").read_text()))}
    first = re.search(r"first row after ([0-9.]+) s", (project / "logs" / "score_archive.bench.log").read_text())
    later = history["images_per_s"].iloc[1:]
    params = yaml.safe_load((project / "params.yaml").read_text())
    return {"train_batch_size": params["train"]["batch_size"], "train_num_workers": params["train"]["num_workers"],
            "train_images_per_s": round(float(later.median()), 1) if len(later) else None,
            "train_first_epoch_s": round(float(history["epoch_time_s"].iloc[0]), 2),
            "train_epochs": len(history), "test_accuracy": metrics.get("accuracy"),
            "test_roc_auc": metrics.get("roc_auc"), "score_images_per_s": scored,
            "score_archive_first_row_s": float(first.group(1)) if first else None}
