"""``evaluate.md``: the evaluation as a person reads it (what was evaluated, on what, when;
each figure once, with words for what a number cannot say).

The tables come from :mod:`pipeline.evaluation.evaluate`; this module only words and lays them out.
Links to plots are relative, and :func:`artifact_dirs` gives MLflow the same layout, so
they work in the repository and in MLflow's artifact view alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path

NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
         "sensitivity": "Sensitivity (recall of {pos})", "specificity": "Specificity",
         "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1",
         "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)"}
THRESHOLD_FREE = ("roc_auc", "pr_auc")  # the same at any threshold: shown once
NOT_DEFINED = "n/a"


@dataclass(frozen=True)
class About:
    """The report's header: what was evaluated, on what and when."""

    name: str
    model: str
    run: str
    data: str
    date: str
    settings: str


@dataclass(frozen=True)
class BinaryTables:
    """The tables of a two-class evaluation."""

    positive: str
    negative: str
    at_05: pd.DataFrame  # rows: metrics; columns value, ci_low, ci_high
    at_operating: pd.DataFrame
    threshold: float
    ci_title: str
    patients: pd.DataFrame  # one row a patient: cells, positive_cells, called_fraction, infected, diagnosis
    patient_summary: dict[str, float]
    patient_threshold: float
    reliability: pd.DataFrame


def write_report(path: Path, about: About, metrics: dict, binary: BinaryTables | None,
                 plots: dict[str, Path]) -> Path:
    """Write the markdown report to ``path``."""
    lines = [f"# Evaluation report: {about.name}, test split", "",
             "| | |", "|:--|:--|", f"| Model | {about.model} |", f"| MLflow run | {about.run} |",
             f"| Data | {about.data} |", f"| Evaluated | {about.date} |",
             f"| Settings | {about.settings} |", ""]
    if binary is not None:
        lines += _binary_sections(binary, metrics)
    else:
        lines += ["## Test split", "", _figures({k: metrics[k] for k in
                                                  ("accuracy", "balanced_accuracy", "sensitivity",
                                                   "specificity", "f1", "roc_auc")}, "macro"), ""]
    per_class = pd.DataFrame(metrics["per_class"]).T.rename_axis("class").reset_index()
    per_class["support"] = per_class["support"].astype(int)
    lines += ["## Per class", "", per_class.round(4).to_markdown(index=False), ""]
    lines += ["## Plots", ""]
    for key, p in plots.items():
        if str(p).endswith(".png"):
            title = Path(p).stem.replace("_", " ")
            lines += [f"![{title}]({os.path.relpath(Path(p).resolve(), path.parent.resolve())})", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def artifact_dirs(files: list[Path], report: Path) -> dict[Path, str | None]:
    """The MLflow artifact folder of each file (None: the top): its folder relative to the
    folder the report and the plots share, so the report's relative links resolve in MLflow too."""
    resolved = [Path(f).resolve() for f in files]
    root = Path(os.path.commonpath([report.resolve().parent, *(f.parent for f in resolved)]))
    dirs = {f: os.path.relpath(f.parent, root).replace(os.sep, "/") for f in resolved}
    return {f: None if d == "." else d for f, d in dirs.items()}


def _binary_sections(b: BinaryTables, metrics: dict) -> list[str]:
    n_patients = len(b.patients)
    lines = [f"## Cells at threshold 0.5 {b.ci_title}", "",
             f"Positive class: {b.positive}. {NOT_DEFINED}: not defined on this split (for "
             "example specificity when no cell of the other class is present).", "",
             _ci_table(b.at_05, b.positive), "",
             f"## Cells at the operating point {b.threshold:.3f} {b.ci_title}", "",
             "The threshold chosen on the validation split to reach the target sensitivity; "
             "the threshold-free figures (AUC) are in the table above.", "",
             _ci_table(b.at_operating.drop(index=list(THRESHOLD_FREE)), b.positive), "",
             f"## Patients ({n_patients})", "",
             f"A patient counts as {b.positive.lower()} when any of their cells is labelled so, and "
             f"is diagnosed so when at least {b.patient_threshold:.0%} of their cells are called "
             f"{b.positive.lower()} at the operating point.", "",
             _patient_sentence(b), "", _patient_table(b), "",
             "## Calibration", "",
             f"Expected calibration error {metrics['ece']:.4f}; log loss {metrics['log_loss']:.4f}; "
             f"temperature {metrics['temperature']:.3f} (1 = not rescaled).", "",
             b.reliability.rename(columns={"bin": "bin", "confidence": "mean predicted probability",
                                           "frequency": f"share {b.positive.lower()}",
                                           "count": "cells"}).round(4).to_markdown(index=False), ""]
    return lines


def _ci_table(frame: pd.DataFrame, positive: str) -> str:
    rows = [{"metric": NAMES.get(m, m).format(pos=positive), "value": _fmt(r["value"]),
             "CI": f"{_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}"} for m, r in frame.iterrows()]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _figures(values: dict[str, float], average: str) -> str:
    rows = [{"metric": NAMES.get(m, m).format(pos=average), "value": _fmt(v)} for m, v in values.items()]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _patient_table(b: BinaryTables) -> str:
    words = {1: b.positive.lower(), 0: b.negative.lower()}
    table = pd.DataFrame({
        "patient": b.patients["patient_id"], "cells": b.patients["cells"],
        f"{b.positive.lower()} cells (label)": b.patients["positive_cells"],
        "share called": b.patients["called_fraction"].round(3),
        "truth": b.patients["infected"].map(words), "diagnosis": b.patients["diagnosis"].map(words)})
    return table.to_markdown(index=False)


def _patient_sentence(b: BinaryTables) -> str:
    per, s = b.patients, b.patient_summary
    pos, neg = int(per["infected"].sum()), int((1 - per["infected"]).sum())
    parts = [f"Patient accuracy {_fmt(s['patient_accuracy'])}."]
    for key, n, who in (("patient_sensitivity", pos, b.positive.lower()),
                        ("patient_specificity", neg, b.negative.lower())):
        label = key.split("_")[1]
        if np.isnan(s[key]):
            parts.append(f"Patient {label} is not defined here: none of the {len(per)} patients is "
                         f"{who}, so there is no such patient to get right or wrong.")
        else:
            parts.append(f"Patient {label} {_fmt(s[key])} ({n} {who} patients).")
    return " ".join(parts)


def _fmt(value: float) -> str:
    return NOT_DEFINED if value is None or not np.isfinite(value) else f"{value:.4f}"
