"""What cross-validation writes for people and for DVC: the OOF table, the report, the
metrics file, the label-noise audit (table and thumbnails) and the sweep table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import UserError
from pipeline.data.prepared import PreparedData, array_file
from pipeline.files import atomic_path, write_json
from pipeline.params import Params
from pipeline.selection import crossval
from pipeline.selection.study import ConfigResult, cross_validate, read_exclude
from pipeline.tracking import dvc_experiment, log_artifact

SHOWN = ("accuracy", "roc_auc", "sensitivity", "specificity")
THUMBNAILS = 32


def _f(value: float) -> str:
    """A figure, or a word where it is undefined (a fold or resample with one class only)."""
    return f"{value:.3f}" if value == value else "undefined"


def _ci(p: dict[str, float], key: str) -> str:
    return f"{_f(p[key])} ({_f(p[key + '_ci_low'])}–{_f(p[key + '_ci_high'])})"


def metrics_of(result: ConfigResult) -> dict[str, float]:
    """The DVC metrics: pooled OOF figures with CIs, and each figure's mean and sd over folds."""
    out = dict(result.pooled)
    for key, (mean, sd) in crossval.mean_sd(result.folds).items():
        out |= {f"fold_mean_{key}": mean, f"fold_sd_{key}": sd}
    return out | {"folds": int(len(result.folds)), "wall_s": round(result.wall_s, 1)}


def images_of(data: PreparedData, paths: pd.Series) -> np.ndarray:
    """The resized images of manifest ``paths``, read from the split arrays."""
    rows = data.manifest.set_index("path").loc[paths.to_numpy()]
    arrays = {s: np.load(data.root / array_file(s), mmap_mode="r") for s in rows["split"].unique()}
    return np.stack([arrays[s][i] for s, i in zip(rows["split"], rows["index"])]) if len(rows) else \
        np.zeros((0, data.image_size, data.image_size, 3), np.uint8)


def write_crossval(result: ConfigResult, data: PreparedData, out_dir: str | Path,
                   metrics_path: str | Path) -> Path:
    """Every output of one configuration's cross-validation; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = result.params.evaluate
    with atomic_path(out / "oof.parquet") as tmp:
        result.oof.to_parquet(tmp, index=False)
    result.folds.to_csv(out / "folds.csv", index=False)
    issues = crossval.label_issues(result.oof, ev.positive_class)
    per_patient = crossval.issues_per_patient(result.oof, issues)
    issues.to_csv(out / "label_issues.csv", index=False)
    per_patient.to_csv(out / "label_issues_per_patient.csv", index=False)
    shown = issues.head(THUMBNAILS)
    from pipeline.plots import thumbnail_grid

    thumbnail_grid(images_of(data, shown["path"]),
                   [f"{r.label[:11]} p={r.p_own_label:.2f}\n{str(r.patient_id)[:14]}" for r in shown.itertuples()],
                   out / "label_issues.png", f"Cells whose out-of-fold prediction contradicts their "
                   f"label (lowest own-label probability first; {len(shown)} of {len(issues)})")
    metrics = metrics_of(result)
    write_json(metrics_path, metrics)
    report = out / "crossval.md"
    report.write_text(_report(result, metrics, issues, per_patient, data.image_size))
    return report


def _figure_rows(m: dict[str, float]) -> str:
    """Each shown figure: pooled with its CI, and its mean ± sd over folds."""
    return "\n".join(f"| {key} | {_ci(m, key)} | {_f(m[f'fold_mean_{key}'])} ± {_f(m[f'fold_sd_{key}'])} |"
                     for key in SHOWN)


def _fold_rows(folds: pd.DataFrame) -> str:
    return "\n".join(f"| {int(r.fold)} | {r.patients} | {r.cells} | {_f(r.accuracy)} | "
                     f"{_f(r.roc_auc)} | {_f(r.sensitivity)} | {_f(r.specificity)} |"
                     for r in folds.itertuples())


def _excluded(exclude: str) -> str:
    """The sentence on cells left out of training (nothing when none were)."""
    return (f"\n\nTraining left out the {len(read_exclude(exclude))} cells listed in "
            f"`{exclude}` (crossval.exclude); the held-out folds still hold every cell, so "
            "these figures compare with a run without the exclusion under the same folds."
            if exclude else "")


def _audit(issues: pd.DataFrame, per_patient: pd.DataFrame, cells: float) -> str:
    """The label-noise audit: how many cells are listed, and the patients with most of them."""
    worst = per_patient[per_patient["listed"] > 0].head(10)
    patients = "\n".join(f"| {r.patient_id} | {r.cells} | {r.listed} | {r.share:.1%} |"
                         for r in worst.itertuples()) or "| (none) | | | |"
    return f"""
## Label-noise audit

{len(issues)} cells ({len(issues) / max(cells, 1):.1%}) have an out-of-fold probability that
contradicts their label by the confident-learning rule (the other class's probability reaches
that class's mean self-confidence). They are listed in `label_issues.csv` for a person to review;
nothing is dropped. `crossval.exclude: <that file>` keeps listed cells out of training (the
held-out folds keep them) so a run shows what excluding them does under the same folds.

![cells to review](label_issues.png)

Patients with the largest share of listed cells:

| patient | cells | listed | share |
|---|---|---|---|
{patients}
"""


def _report(result: ConfigResult, m: dict[str, float], issues: pd.DataFrame,
            per_patient: pd.DataFrame, image_size: int) -> str:
    cv, ev = result.params.crossval, result.params.evaluate
    return f"""# Cross-validation: {result.name}

{cv.folds}-fold cross-validation by patient (fold seed {cv.seed}) over the training and
validation patients: {m['patients']} patients, {m['cells']} cells. The test patients take no
part. Each fold trained with the params ({result.params.train.model}, {image_size} px,
up to {result.params.train.epochs} epoch(s){', TTA' if ev.tta else ''}) on the other folds and
predicted its own patients; every cell below has exactly one out-of-fold prediction.{_excluded(cv.exclude)}

## Pooled out-of-fold figures at threshold 0.5

{ev.ci_level:.0%} confidence intervals resample patients ({ev.bootstrap} draws). The fold
mean ± sd shows how much one split of patients can move a figure.

| metric | pooled (CI) | fold mean ± sd |
|---|---|---|
{_figure_rows(m)}

Patient level (a patient is called infected when {ev.patient_threshold:.0%} of their cells are
called positive): accuracy {_f(m['patient_accuracy'])}, sensitivity {_f(m['patient_sensitivity'])},
specificity {_f(m['patient_specificity'])}.

| fold | patients | cells | accuracy | AUC | sensitivity | specificity |
|---|---|---|---|---|---|---|
{_fold_rows(result.folds)}

Wall time of the trials: {result.wall_s / 60:.1f} min.
""" + _audit(issues, per_patient, m["cells"])


def sweep_table(results: list[ConfigResult]) -> str:
    """Markdown table of a sweep: pooled OOF figures with CIs, patient accuracy, wall time."""
    head = ("| configuration | overrides | accuracy | AUC | sensitivity | specificity | "
            "patient accuracy | wall (min) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        over = ", ".join(f"`{k}={v}`" for k, v in r.overrides.items()) or "params.yaml"
        if r.failed:
            lines.append(f"| {r.name} | {over} | failed: {'; '.join(r.failed)} | | | | | |")
            continue
        p = r.pooled
        lines.append(f"| {r.name} | {over} | " + " | ".join(_ci(p, k) for k in SHOWN) +
                     f" | {_f(p['patient_accuracy'])} | {r.wall_s / 60:.1f} |")
    return "\n".join(lines) + "\n"


def crossval_params(params: Params, prepared: str | Path, out_dir: str | Path, metrics_path: str | Path,
                    work_dir: str | Path = "checkpoints/crossval") -> tuple[ConfigResult, Path]:
    """Cross-validate the params as they are; write the report, OOF table and metrics."""
    name = f"{dvc_experiment()}/crossval-{params.crossval.folds}fold"
    result = cross_validate(params, {"params": {}}, prepared, name, work_dir=work_dir)[0]
    if result.failed:
        raise UserError("cross-validation failed: " + "; ".join(result.failed))
    report = write_crossval(result, PreparedData(prepared), out_dir, metrics_path)
    log_artifact(result.parent_run_id, out_dir, "crossval")  # the summary, on the parent run
    return result, report


def sweep(params: Params, grid: dict[str, dict[str, Any]], prepared: str | Path, raw: str | Path | None,
          out_dir: str | Path, work_dir: str | Path = "checkpoints/sweep", name: str = "") -> list[ConfigResult]:
    """Cross-validate every configuration of ``grid``; write ``sweep.md``/``sweep.json`` and
    each configuration's report under ``out_dir``. A failed configuration is a table row."""
    out = Path(out_dir)
    name = name or f"sweep-seed{params.crossval.seed}"
    results = cross_validate(params, grid, prepared, name, raw=raw, work_dir=work_dir)
    out.mkdir(parents=True, exist_ok=True)  # the table is written even when every configuration failed
    for r in results:
        if not r.failed:
            write_crossval(r, PreparedData(r.prepared), out / r.name, out / r.name / "metrics.json")
    (out / "sweep.md").write_text(sweep_table(results))
    write_json(out / "sweep.json", [{"configuration": r.name, "overrides": r.overrides,
                                     "failed": r.failed, **(metrics_of(r) if not r.failed else {})}
                                    for r in results])
    log_artifact(results[0].parent_run_id, out, "sweep")  # the summary, on the parent run
    return results
