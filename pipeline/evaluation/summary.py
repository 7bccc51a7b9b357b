"""Short views of results for a terminal (at most 120 columns, headline figures first):
the workspace's metrics, and DVC experiments side by side.

``dvc metrics show`` prints every key of every metrics file (about 40 columns) and
``dvc exp show`` every param too; these views keep what a person compares first.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.metrics import HEADLINE_METRICS

WIDTH = 120
METRICS_FILE = Path("metrics/evaluate.json")
TRAIN_METRICS_FILE = Path("metrics/train.json")
# (key in metrics/evaluate.json, short column name), in the order people read them.
HEADLINE = (("accuracy", "acc"), ("roc_auc", "auc"), ("sensitivity", "sens"),
            ("specificity", "spec"), ("ppv", "ppv"), ("npv", "npv"),
            ("patient_accuracy", "pat_acc"))


def headline(metrics: dict[str, Any]) -> str:
    """The test figures in one line: cells, patients, then the headline metrics."""
    figures = ", ".join(f"{short} {_num(metrics[key])}" for key, short in HEADLINE if key in metrics)
    return f"test ({_count(metrics, 'n')} cells, {_count(metrics, 'patients')} patients): {figures}"


def _count(metrics: dict[str, Any], key: str) -> str:
    return str(int(metrics[key])) if isinstance(metrics.get(key), (int, float)) else "?"


def metrics_view(metrics: dict[str, Any], train: dict[str, Any] | None = None) -> str:
    """The headline test figures of one evaluation, with their CIs where computed."""
    rows = []
    for key, _ in HEADLINE:
        if key not in metrics:
            continue
        ci = (f"{_num(metrics.get(key + '_ci_low'))} to {_num(metrics.get(key + '_ci_high'))}"
              if key in HEADLINE_METRICS and key + "_ci_low" in metrics else "")
        rows.append({"metric": key, "value": _num(metrics[key]), "95% CI (patients)": ci})
    n = f"test split: {_count(metrics, 'n')} cells, {_count(metrics, 'patients')} patients"
    lines = [n, pd.DataFrame(rows).to_string(index=False)]
    if "operating_threshold" in metrics:
        lines.append(f"operating point {metrics['operating_threshold']:.3f}: sensitivity "
                     f"{_num(metrics.get('operating_sensitivity'))}, specificity "
                     f"{_num(metrics.get('operating_specificity'))}")
    if train:
        lines.append(f"training: kept epoch {train.get('best_epoch')}, val_acc "
                     f"{_num(train.get('val_acc'))}, val_loss {_num(train.get('val_loss'))}")
    return "\n".join(lines)


def experiments_view(exp_show: list[dict[str, Any]], width: int = WIDTH) -> str:
    """``dvc exp show --json`` as one row an experiment: its name, the params that differ
    between rows, then the headline metrics; columns dropped from the right to fit ``width``."""
    rows = list(_rows(exp_show))
    if not rows:
        return "no experiments yet: dvc exp run -S train.epochs=4 (for example)"
    frame = pd.DataFrame(rows)
    params = [c for c in frame.columns if c.startswith("p:") and frame[c].astype(str).nunique() > 1]
    metrics = [short for _, short in HEADLINE if short in frame.columns]
    frame = frame[["experiment", *params, *metrics]].rename(columns=lambda c: c.removeprefix("p:"))
    while len(frame.columns) > 2 and _width(frame) > width:
        frame = frame.iloc[:, :-1]
    return frame.to_string(index=False)


def _rows(exp_show: list[dict[str, Any]]):
    for commit in exp_show:
        yield _row(commit, commit.get("name") or _short(commit.get("rev", "")))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                yield _row(rev, rev.get("name") or _short(rev.get("rev", "")))


def _row(entry: dict[str, Any], name: str) -> dict[str, Any]:
    data = entry.get("data") or {}
    row: dict[str, Any] = {"experiment": name[:24]}
    for file, content in (data.get("params") or {}).items():
        for key, value in _flat((content or {}).get("data") or {}).items():
            row[f"p:{key}"] = value
    evaluate = ((data.get("metrics") or {}).get(str(METRICS_FILE)) or {}).get("data") or {}
    for key, short in HEADLINE:
        if key in evaluate:
            row[short] = _num(evaluate[key])
    return row


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _width(frame: pd.DataFrame) -> int:
    return max(len(line) for line in frame.to_string(index=False).splitlines())


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def show(project: Path = Path(".")) -> str:
    """Both views for the DVC project in ``project`` (the experiments only in a git repo)."""
    metrics_path = project / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run `dvc repro` (or `make demo`) first")
    train_path = project / TRAIN_METRICS_FILE
    train = json.loads(train_path.read_text()) if train_path.is_file() else None
    parts = [metrics_view(json.loads(metrics_path.read_text()), train)]
    if (project / ".git").exists():
        out = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project,
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            parts += ["", "experiments (params that differ, then test figures):",
                      experiments_view(json.loads(out.stdout))]
    return "\n".join(parts)


def _short(rev: str) -> str:
    return rev if rev == "workspace" else rev[:7]
