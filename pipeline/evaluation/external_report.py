"""External validation's record: the registered version under test as MLflow holds it (its
training patients, its operating point), and the result written back: ``external.md`` worded for
people, ``external.json`` (every figure), ``cells.parquet`` (one row per cell), a reliability
diagram and the most confident errors (PNG), an MLflow run in the model's experiment and one
line of the version's description.

The figures come from :mod:`pipeline.evaluation.external`; this module reads and writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd

from pipeline.config import UserError
from pipeline.evaluation.report import NAMES, NOT_DEFINED
from pipeline.files import atomic_path, write_json
from pipeline.metrics import HEADLINE_METRICS
from pipeline.plots import figure, thumbnail_grid
from pipeline.serving.screening import OK

POINTS = ("threshold_0.5", "operating_point")  # the two thresholds every table is given at
REPORTED = ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv")
WORST_PATIENTS = 10
SHORT = {"accuracy": "accuracy", "roc_auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity"}


@dataclass(frozen=True)
class ModelUnderTest:
    """The registered version validated, and what its training run recorded."""

    name: str
    version: str
    run_id: str
    experiment_id: str
    checkpoint: Path
    threshold: float  # the operating point (0.5 when the run has none)
    threshold_note: str  # where it came from
    trained_on: frozenset[str]  # its training (and validation) patients
    tta: bool = False  # scored with test-time augmentation, as evaluate scored it


def model_under_test(model_uri: str) -> ModelUnderTest:
    """The registered version ``model_uri`` names, its training patients and operating point."""
    from pipeline.serving.pyfunc import checkpoint_of
    from pipeline.serving.registry import ComparisonRefused, champion_training_groups
    from pipeline.serving.score import resolve_model

    resolved = resolve_model(model_uri)
    if not (resolved.name and resolved.version):
        raise UserError(f"{model_uri} is not a registered model version: external validation needs "
                        "one (models:/<name>@<alias> or models:/<name>/<version>), whose training "
                        "patients are on record")
    client = mlflow.MlflowClient()
    mv = client.get_model_version(resolved.name, resolved.version)
    try:
        trained_on = champion_training_groups(mv)
    except ComparisonRefused as exc:
        raise UserError(f"cannot validate {mv.name} v{mv.version} externally: {exc}") from None
    run = client.get_run(mv.run_id)
    threshold, note = operating_threshold(run.data.metrics)
    tta = bool(run.data.metrics.get("test_tta", 0.0))  # the operating point's probabilities had it
    return ModelUnderTest(mv.name, str(mv.version), mv.run_id, run.info.experiment_id, checkpoint_of(resolved.uri),
                          threshold, note + ("; TTA on, as evaluate had it" if tta else ""), frozenset(trained_on), tta)


def operating_threshold(run_metrics: dict[str, float]) -> tuple[float, str]:
    """The operating point ``evaluate`` logged to the training run, and a note on it."""
    if "test_operating_threshold" not in run_metrics:
        return 0.5, "none recorded in the training run (no test_operating_threshold): 0.5 used"
    note = "chosen on the validation split by evaluate (the training run's test_operating_threshold)"
    temperature = run_metrics.get("test_temperature", 1.0)
    if abs(temperature - 1.0) > 1e-6:
        note += (f"; on probabilities scaled by temperature {temperature:.3f}, which the served model "
                 "does not apply: read the operating-point figures with that in mind")
    return float(run_metrics["test_operating_threshold"]), note


def record(out_dir: Path, figures: dict[str, Any], cells: pd.DataFrame, archive: Path,
           errors_shown: int) -> tuple[Path, str, str]:
    """Write the report inside an MLflow run of the model's experiment, then note it on the
    version. Returns the report's path, the run id and the description line."""
    from pipeline.serving.registry_lock import registry_lock
    from pipeline.tracking import RunLogger

    about, client = figures["about"], mlflow.MlflowClient()
    run = client.create_run(about["experiment_id"], run_name=f"external/{archive.stem}/v{about['model_version']}",
                            tags={"validation": "external", "model_name": about["model_name"],
                                  "model_version": about["model_version"], "archive": archive.name})
    run_id = about["run_id"] = run.info.run_id
    try:
        shown = confident_errors(cells, errors_shown)
        files = write_external(out_dir, figures, cells, shown, load_cells(archive, shown["path"]))
        RunLogger(client, run_id).log_metrics(run_metrics(figures), step=0)
        for path in files:
            client.log_artifact(run_id, str(path))
        line = description_line(figures)
        client.set_tag(run_id, "mlflow.note.content", line)
        with registry_lock(about["model_name"]):  # one read-modify-write of the description at a time
            mv = client.get_model_version(about["model_name"], about["model_version"])
            client.update_model_version(mv.name, mv.version,
                                        description=f"{(mv.description or '').rstrip()}\n\n{line}".strip())
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return files[0], run_id, line


def load_cells(archive: Path, paths: Sequence[str]) -> list[np.ndarray]:
    """The decoded pixels of some of the archive's cells, as they are in it (for thumbnails)."""
    import zipfile

    from pipeline.data.images import load_rgb

    with zipfile.ZipFile(archive) as zf:
        return [load_rgb(zf.read(path)) for path in paths]


def confident_errors(cells: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` answered cells called wrong at the operating point with the most confidence."""
    wrong = cells[(cells["status"] == OK) & ~cells["correct"]]
    confidence = np.where(wrong["is_pos"], 1 - wrong["p_model"], wrong["p_model"])
    return wrong.assign(confidence=confidence).nlargest(n, "confidence")


def write_external(out_dir: Path, figures: dict[str, Any], cells: pd.DataFrame, shown: pd.DataFrame,
                   images: list[np.ndarray]) -> list[Path]:
    """``external.md``, ``external.json``, ``cells.parquet`` and the PNGs, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    about, calibration = figures["about"], figures["calibration"]
    files = [out_dir / "external.md", out_dir / "external.json", out_dir / "cells.parquet",
             _reliability_png(calibration, about["positive_class"], out_dir / "reliability.png")]
    grid = out_dir / "confident_errors.png"
    if images:
        titles = [f"{r.patient_id} {r.label}\nP({about['positive_class'][:4]}) {r.p_model:.2f}"
                  for r in shown.itertuples()]
        files.append(thumbnail_grid(images, titles, grid,
                                    "Most confident errors at the operating point"))
    else:  # none: drop a grid an earlier run left
        grid.unlink(missing_ok=True)
    write_json(files[1], _json_safe(figures))
    with atomic_path(files[2]) as tmp:
        cells.to_parquet(tmp, index=False)
    with atomic_path(files[0]) as tmp:
        tmp.write_text(render(figures, [f.name for f in files[3:]]))
    return files


def render(figures: dict[str, Any], pngs: list[str]) -> str:
    """``external.md``: what was validated, on what, and each figure once, in words and tables."""
    answers, pos = figures["answers"], figures["about"]["positive_class"]
    threshold = figures["operating_threshold"]
    ci = (f"({figures['ci_level']:.0%} CI, bootstrap over {answers['patients']} patients x "
          f"{figures['bootstrap']})")
    patients = (f"A patient counts as {pos.lower()} when any of their cells is labelled so, and is "
                f"diagnosed so when at least {figures['patient_threshold']:.0%} of their cells are "
                f"called {pos.lower()} (a cell without answer is called wrong); the AUC ranks patients "
                "by that share.")
    errors = ("The answered cells called wrong at the operating point with the most confidence: "
              "![confident errors](confident_errors.png)" if "confident_errors.png" in pngs
              else "No answered cell was called wrong at the operating point.")
    files = ("`external.json`: every figure; `cells.parquet`: one row per cell (`patient_id`, `is_pos`, "
             "`status`, `p_model`, `p_pos`, `correct`), the table "
             "`pipeline.evaluation.external.paired_difference` compares two models on.")
    return "\n".join([
        *_header(figures), "## Answers", "", _answers_sentence(answers), "",
        f"## Cells {ci}", "", "The AUC does not depend on the threshold: both columns give it.", "",
        _ci_table(figures["cells"], threshold, pos), "",
        f"## Patients {ci}", "", patients, "", _ci_table(figures["patients"], threshold, pos), "",
        f"## The {WORST_PATIENTS} worst patients (at the operating point)", "",
        _worst_table(figures["per_patient"], pos), "",
        "## Calibration", "", _calibration_sentence(figures["calibration"]), "",
        "![reliability](reliability.png)", "", "## Most confident errors", "", errors, "",
        "## Files", "", files, ""])


def _header(figures: dict[str, Any]) -> list[str]:
    about, answers = figures["about"], figures["answers"]
    model, excluded = f"{about['model_name']} v{about['model_version']}", about["excluded_patients"]
    overlap = (f"{len(excluded)} in the archive, left out: {', '.join(excluded)}" if excluded
               else "none in the archive")
    return [f"# External validation: {model} on {Path(about['archive']).name}", "",
            "| | |", "|:--|:--|",
            (f"| Model | `models:/{about['model_name']}/{about['model_version']}`, training run "
             f"`{about['training_run']}` |"),
            (f"| Archive | `{about['archive']}` (sha256 {about['archive_sha256'][:16]}...): "
             f"{answers['cells']} cells of {answers['patients']} patients; skipped, not images: "
             f"{_listed(about['skipped_files'])} |"),
            f"| Training patients | {overlap} |",
            f"| Operating point | {figures['operating_threshold']:.3f}: {about['threshold_note']} |",
            f"| Validated | {about['date']}; MLflow run `{about['run_id']}` |", ""]


def _listed(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(f"`{n}`" for n in names[:shown]) + more) if names else "none"


def _answers_sentence(a: dict[str, Any]) -> str:
    return (f"The served model answered {a['ok']} of {a['cells']} cells; {a['rejected']} rejected "
            f"(refused by its input checks or out of distribution) and {a['error']} unreadable: "
            f"{a['unanswered_share']:.1%} without answer. Every figure counts a cell without answer "
            "as an error (the opposite class at any threshold, probability 0.5 for the AUC); the "
            "worst-patients table gives each patient's count.")


def _ci_table(tables: dict[str, dict], threshold: float, pos: str) -> str:
    rows = []
    for metric in REPORTED:
        row = {"metric": NAMES[metric].format(pos=pos)}
        for point, label in zip(POINTS, ("at 0.5", f"at {threshold:.3f}")):
            r = tables[point][metric]
            row[label] = _fmt(r["value"])
            row[f"CI {label}"] = f"{_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}"
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _worst_table(per_patient: list[dict[str, Any]], pos: str) -> str:
    words = {1: pos.lower(), 0: f"not {pos.lower()}"}
    rows = [{"patient": p["patient_id"], "cells": p["cells"], "rejected": p["rejected"],
             "unreadable": p["errors"], "accuracy": _fmt(p["accuracy"]), "truth": words[p["infected"]],
             "call": words[p["diagnosis"]] if p["called"] else "none: most cells without answer"}
            for p in per_patient[:WORST_PATIENTS]]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _calibration_sentence(c: dict[str, Any]) -> str:
    return (f"Expected calibration error {_fmt(c['ece'])} over the {c['answered_cells']} answered cells "
            "(a cell without answer has no probability to calibrate).")


def _reliability_png(calibration: dict[str, Any], pos: str, path: Path) -> Path:
    table = pd.DataFrame(calibration["reliability"], columns=["confidence", "frequency"])
    fig = figure((4.5, 4.5))
    ax = fig.subplots()
    ax.plot(table["confidence"], table["frequency"], marker="o", label=f"ECE = {_fmt(calibration['ece'])}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel=f"Predicted P({pos})", ylabel="Observed frequency", xlim=(0, 1), ylim=(0, 1.02),
           title="Reliability diagram (answered cells)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def run_metrics(figures: dict[str, Any]) -> dict[str, float]:
    """The figures as flat MLflow metrics: ``cell_accuracy``, ``cell_op_accuracy_ci_low``, ..."""
    out: dict[str, float] = {}
    for level, prefix in (("cells", "cell"), ("patients", "patient")):
        for point, infix in zip(POINTS, ("", "_op")):
            for metric in REPORTED:
                for key, value in figures[level][point][metric].items():
                    if value is not None:
                        out[f"{prefix}{infix}_{metric}{'' if key == 'value' else '_' + key}"] = value
    a = figures["answers"]
    out.update(cells=a["cells"], patients=a["patients"], rejected_cells=a["rejected"],
               unreadable_cells=a["error"], unanswered_share=a["unanswered_share"],
               operating_threshold=figures["operating_threshold"],
               excluded_patients=len(figures["about"]["excluded_patients"]))
    if math.isfinite(figures["calibration"]["ece"]):
        out["ece"] = figures["calibration"]["ece"]
    return {k: float(v) for k, v in out.items()}


def description_line(figures: dict[str, Any]) -> str:
    """The line the model version's description gets: where, how many, the headline figures."""
    about, a, cells = figures["about"], figures["answers"], figures["cells"]["threshold_0.5"]
    shown = ", ".join(f"{SHORT[m]} {_fmt(cells[m]['value'], 3)} ({_fmt(cells[m]['ci_low'], 3)}-"
                      f"{_fmt(cells[m]['ci_high'], 3)})" for m in HEADLINE_METRICS)
    return (f"External validation on {Path(about['archive']).name} ({a['patients']} patients, "
            f"{a['cells']} cells, {about['date'][:10]}): {shown} at threshold 0.5; "
            f"{a['cells'] - a['ok']} cells without answer; run {about['run_id']}")


def _fmt(value: float | None, digits: int = 4) -> str:
    return NOT_DEFINED if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN (a figure undefined here) as null: strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return None
    return obj
