"""External validation: a labelled archive of patients a registered model never saw, scored
through the served model's code path (decoding, input checks, reject option), with
patient-bootstrap confidence intervals at 0.5 and at the model's operating point, calibration,
the worst patients and the most confident errors, recorded as an MLflow run beside the model
version and as one line of the version's description (``pipeline validate``).

A cell the model rejects or cannot read got no answer: every figure counts it as an error (the
opposite class for the thresholded figures, probability 0.5 for the AUC), and the report counts
such cells on their own. A patient the model trained on never enters a figure: refused, or left
out and named. :func:`paired_difference` compares two models on the same cells (model selection).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline import clinical
from pipeline.config import ConfigError, PrepareConfig, UserError, ValidateConfig
from pipeline.console import progress
from pipeline.data.archive import check_archive
from pipeline.data.datasets import DatasetSpec, is_image_name
from pipeline.evaluation.external_report import ModelUnderTest, model_under_test, record
from pipeline.serving.inference import Predictor
from pipeline.serving.predictions import score_rows
from pipeline.serving.score_inputs import decode_batch, list_inputs
from pipeline.serving.screening import ERROR, OK, REJECTED

log = logging.getLogger(__name__)

POINTS = ("threshold_0.5", "operating_point")
BATCH = 256  # cells decoded and scored at a time: memory stays flat on a large archive
# A cell without an answer as the thresholded figures see it: the wrong class at any threshold in [0, 1].
WRONG_IF_POSITIVE, WRONG_IF_NEGATIVE = -1.0, 2.0


@dataclass(frozen=True)
class ExternalResult:
    report: Path
    figures: dict[str, Any]  # what external.json holds
    run_id: str
    description: str  # the line appended to the version's description

    def summary(self) -> str:
        """One line for the console."""
        return f"{self.description} -> {self.report}"


def validate(cfg: ValidateConfig, model_uri: str, out_dir: str | Path, spec: DatasetSpec,
             positive_class: str, patient_threshold: float,
             limits: PrepareConfig | None = None) -> ExternalResult:
    """Score ``cfg.archive`` with the registered ``model_uri``; write the report to ``out_dir``,
    log it as an MLflow run in the model's experiment and note it on the model version
    (``limits``: the archive checks ``prepare`` makes; its defaults if None).

    Raises:
        UserError: no archive, an archive or model that cannot be used, or patients the model
            trained on (unless ``cfg.exclude_overlap``), each said in one sentence.
    """
    from pipeline.tracking import setup_mlflow

    if not cfg.archive:
        raise ConfigError("validate.archive is empty: name a zip of <class>/<image> files of new "
                          "patients (pipeline validate ARCHIVE, or -S validate.archive=...)")
    if spec.kind != "archive" or not spec.has_patients:
        raise ConfigError(f"dataset {spec.name} has no patient in its file names: external "
                          "validation resamples patients and checks them against the training ones")
    archive = Path(cfg.archive)
    if not archive.is_file():
        raise UserError(f"{archive} not found: give the zip of the new patients' labelled cells")
    setup_mlflow()
    model = model_under_test(model_uri)
    predictor = Predictor.from_checkpoint(model.checkpoint, tta=model.tta)
    classes = list(predictor.meta.class_names)
    if len(classes) != 2 or positive_class not in classes:
        raise ConfigError(f"evaluate.positive_class {positive_class!r} is not one of the two classes "
                          f"of {model.name} v{model.version} ({', '.join(classes)})")
    cells, skipped = archive_cells(archive, spec, classes, limits)
    cells, excluded = keep_unseen(cells, model, cfg.exclude_overlap)
    scored = score_cells(predictor, cells, positive_class)
    scored["correct"] = (called_scores(scored) >= model.threshold) == scored["is_pos"]
    figures = external_figures(scored, model.threshold, patient_threshold, cfg)
    figures["about"] = _about(archive, model, positive_class, cfg, skipped, excluded)
    report, run_id, line = record(Path(out_dir), figures, scored, archive, cfg.errors_shown)
    return ExternalResult(report, figures, run_id, line)


def archive_cells(archive: Path, spec: DatasetSpec, classes: Sequence[str],
                  limits: PrepareConfig | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The archive's cells (``path``, ``container``, ``label``, ``patient_id``) and the files
    skipped (system files, files not named as images); refuses cells of no known class or patient."""
    check_archive(archive, limits or PrepareConfig())
    entries, skipped = list_inputs(archive)
    images = entries["path"].map(is_image_name).astype(bool)
    skipped = [*skipped, *entries.loc[~images, "path"]]
    cells = entries[images].reset_index(drop=True)
    if cells.empty:
        raise UserError(f"{archive} holds no image files")
    for column, read in (("label", spec.label_of), ("patient_id", spec.group_of)):
        values, bad = [], []
        for path in cells["path"]:
            try:
                values.append(read(path))
            except ValueError:
                values.append(None)
                bad.append(path)
        if bad:
            raise UserError(f"{len(bad)} files of {archive} have no {column.replace('_id', '')} in "
                            f"their path (e.g. '{bad[0]}'): use the layout prepare reads, "
                            f"<root>/<class>/<file> with {spec.name}'s file names")
        cells[column] = values
    unknown = sorted(set(cells["label"]) - set(classes))
    if unknown:
        raise UserError(f"{archive} has class folders the model does not know: {', '.join(unknown)} "
                        f"(its classes: {', '.join(classes)})")
    return cells, skipped


def keep_unseen(cells: pd.DataFrame, model: ModelUnderTest, exclude: bool) -> tuple[pd.DataFrame, list[str]]:
    """The cells of patients the model never trained on, and the patients left out; refuses any
    overlap unless ``exclude``."""
    seen = sorted(set(cells["patient_id"]) & model.trained_on)
    if not seen:
        return cells, []
    n = cells["patient_id"].nunique()
    if not exclude:
        raise UserError(f"{len(seen)} of the archive's {n} patients are training patients of "
                        f"{model.name} v{model.version} (e.g. {', '.join(seen[:5])}): figures on them "
                        "would flatter it. Validate on patients it never saw, or leave these out with "
                        "--exclude-overlap (validate.exclude_overlap: true)")
    if len(seen) == n:
        raise UserError(f"all {n} patients of the archive are training patients of {model.name} "
                        f"v{model.version}: nothing is left to validate on")
    log.warning("left out %d of %d patients that %s v%s trained on: %s", len(seen), n, model.name,
                model.version, ", ".join(seen))
    return cells[~cells["patient_id"].isin(seen)].reset_index(drop=True), seen


def score_cells(predictor: Predictor, cells: pd.DataFrame, positive: str) -> pd.DataFrame:
    """One row per cell as the served model answers it: ``status``, ``reason``, ``p_model`` (the
    positive probability; NaN without an answer) and ``p_pos`` (0.5 without an answer)."""
    parts = []
    with progress(total=len(cells), desc="validate", unit="cell") as bar:
        for start in range(0, len(cells), BATCH):
            batch = cells.iloc[start:start + BATCH]
            decoded = decode_batch(batch, predictor.meta.image_size, predictor.limits)
            parts.append(score_rows(predictor, decoded["pixels"], [e or None for e in decoded["error"]],
                                    [r or None for r in decoded["rejected"]], stats=decoded["appearance"]))
            bar.update(len(batch))
    rows = pd.concat(parts, ignore_index=True)
    p_model = rows[f"prob_{positive}"].to_numpy(float)
    return pd.DataFrame({"path": cells["path"], "patient_id": cells["patient_id"], "label": cells["label"],
                         "is_pos": (cells["label"] == positive).to_numpy(), "status": rows["status"],
                         "reason": rows["reason"], "ood_score": rows["ood_score"], "p_model": p_model,
                         "p_pos": np.where(rows["status"] == OK, p_model, 0.5)})


def called_scores(cells: pd.DataFrame) -> np.ndarray:
    """The probability the thresholded figures read: a cell without an answer is always wrong."""
    wrong = np.where(cells["is_pos"], WRONG_IF_POSITIVE, WRONG_IF_NEGATIVE)
    return np.where(cells["status"] == OK, cells["p_model"], wrong)


def external_figures(cells: pd.DataFrame, threshold: float, patient_threshold: float,
                     cfg: ValidateConfig) -> dict[str, Any]:
    """Cell- and patient-level figures at 0.5 and at ``threshold``, each with a patient-bootstrap
    CI (one seed: every table resamples the same patients), answers, calibration, patients
    (``cells``: :func:`score_cells`' table with ``correct`` at ``threshold``)."""
    is_pos, groups = cells["is_pos"].to_numpy(bool), cells["patient_id"].to_numpy()
    called = called_scores(cells)
    boot = {"n_boot": cfg.bootstrap, "level": cfg.ci_level}
    auc = clinical.bootstrap_ci(is_pos, cells["p_pos"].to_numpy(), groups, 0.5, **boot)
    out: dict[str, Any] = {"cells": {}, "patients": {}}
    for point, t in zip(POINTS, (0.5, threshold)):
        table = clinical.bootstrap_ci(is_pos, called, groups, t, **boot)
        table.loc[["roc_auc", "pr_auc"]] = auc.loc[["roc_auc", "pr_auc"]]
        out["cells"][point] = _records(table)
        per, _ = clinical.patient_level(groups, is_pos, called, t, patient_threshold)
        out["patients"][point] = _records(clinical.bootstrap_ci(
            per["infected"].to_numpy(), per["called_fraction"].to_numpy(), per["patient_id"].to_numpy(),
            patient_threshold, **boot))
    answered = (cells["status"] == OK).to_numpy()
    ece, reliability = (clinical.expected_calibration_error(is_pos[answered], cells["p_model"][answered])
                        if answered.any() else (float("nan"), pd.DataFrame()))
    status = cells["status"].value_counts()
    out["answers"] = {"cells": len(cells), "patients": int(cells["patient_id"].nunique()),
                      "ok": int(status.get(OK, 0)), "rejected": int(status.get(REJECTED, 0)),
                      "error": int(status.get(ERROR, 0)), "unanswered_share": float(1 - answered.mean())}
    out["calibration"] = {"ece": ece, "answered_cells": int(answered.sum()),
                          "reliability": reliability.to_dict("records")}
    out["per_patient"] = per_patient(cells, called, threshold, patient_threshold).to_dict("records")
    out.update(operating_threshold=threshold, patient_threshold=patient_threshold,
               bootstrap=cfg.bootstrap, ci_level=cfg.ci_level)
    return out


def per_patient(cells: pd.DataFrame, called: np.ndarray, threshold: float,
                patient_threshold: float) -> pd.DataFrame:
    """Per patient at the operating point: cells, rejected, errors, the share without an answer,
    cell accuracy, truth, diagnosis, and ``called`` (false when most cells got no answer)."""
    per, _ = clinical.patient_level(cells["patient_id"].to_numpy(), cells["is_pos"].to_numpy(), called,
                                    threshold, patient_threshold)
    grouped = cells.groupby("patient_id")
    extra = pd.DataFrame({"rejected": grouped["status"].apply(lambda s: int((s == REJECTED).sum())),
                          "errors": grouped["status"].apply(lambda s: int((s == ERROR).sum())),
                          "accuracy": grouped["correct"].mean()}).reset_index()
    per = per.merge(extra, on="patient_id")
    per["unanswered_share"] = (per["rejected"] + per["errors"]) / per["cells"]
    per["called"] = per["unanswered_share"] < 0.5
    return per.sort_values(["accuracy", "unanswered_share"], ascending=[True, False]).reset_index(drop=True)


def _records(table: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """A metric table as JSON: NaN (undefined here) becomes null."""
    return {m: {k: (float(v) if np.isfinite(v) else None) for k, v in row.items()}
            for m, row in table.iterrows()}


def _about(archive: Path, model: ModelUnderTest, positive: str, cfg: ValidateConfig,
           skipped: list[str], excluded: list[str]) -> dict[str, Any]:
    import hashlib

    with open(archive, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return {"archive": Path(archive).name, "archive_sha256": sha256, "skipped_files": skipped,
            "model_name": model.name, "model_version": model.version, "training_run": model.run_id,
            "experiment_id": model.experiment_id, "positive_class": positive,
            "threshold_note": model.threshold_note, "excluded_patients": excluded,
            "exclude_overlap": cfg.exclude_overlap,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _patient_resamples(groups: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap replicate, whole patients drawn with replacement (the draws
    of :func:`pipeline.clinical.bootstrap_ci` for the same seed)."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


def paired_difference(first: pd.DataFrame | Sequence[pd.DataFrame],
                      second: pd.DataFrame | Sequence[pd.DataFrame], n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0, threshold: float = 0.5) -> pd.DataFrame:
    """Accuracy and ROC AUC of ``first`` minus ``second`` on the same cells, with a patient-bootstrap
    CI: each replicate draws patients once and scores both models on that draw.

    Each table has one row per cell, in the same order: ``patient_id``, ``is_pos``, and ``correct``
    or ``p_pos`` (the positive probability, called at ``threshold``); the AUC needs ``p_pos`` in
    both (NaN otherwise). A side may be a list of tables, one per training seed, paired by position:
    figures are then means over seeds, each seed scored on the same patient draws. Returns rows
    ``accuracy``, ``roc_auc``; columns ``first``, ``second``, ``difference``, ``ci_low``, ``ci_high``.
    """
    firsts, seconds = ([t] if isinstance(t, pd.DataFrame) else list(t) for t in (first, second))
    if len(firsts) != len(seconds) or not firsts:
        raise ValueError(f"a paired comparison needs as many seeds on each side: {len(firsts)} and {len(seconds)}")
    tables = firsts + seconds
    for table in tables[1:]:
        _check_paired(tables[0], table)
    is_pos = tables[0]["is_pos"].to_numpy(bool)
    correct = [t["correct"].to_numpy(bool) if "correct" in t else (t["p_pos"].to_numpy() >= threshold) == is_pos
               for t in tables]
    probs = [t["p_pos"].to_numpy(float) if "p_pos" in t else None for t in tables]

    def auc(p: np.ndarray | None, idx: np.ndarray) -> float:
        two = p is not None and 0 < is_pos[idx].sum() < len(idx)
        return float(skm.roc_auc_score(is_pos[idx], p[idx])) if two else float("nan")

    def figures(idx: np.ndarray) -> np.ndarray:  # [metric, side]: each side's mean over its seeds
        values = np.array([[c[idx].mean() for c in correct], [auc(p, idx) for p in probs]])
        return np.stack([values[:, :len(firsts)].mean(1), values[:, len(firsts):].mean(1)], axis=1)

    point = figures(np.arange(len(is_pos)))
    draws = [np.subtract(*figures(idx).T) for idx in _patient_resamples(tables[0]["patient_id"].to_numpy(),
                                                                         n_boot, seed)]
    boot = pd.DataFrame(draws, columns=["accuracy", "roc_auc"])
    alpha = (1 - level) / 2
    return pd.DataFrame({"first": point[:, 0], "second": point[:, 1], "difference": point[:, 0] - point[:, 1],
                         "ci_low": boot.quantile(alpha).to_numpy(), "ci_high": boot.quantile(1 - alpha).to_numpy()},
                        index=["accuracy", "roc_auc"])


def _check_paired(first: pd.DataFrame, second: pd.DataFrame) -> None:
    for name, table in (("first", first), ("second", second)):
        missing = {"patient_id", "is_pos"} - set(table.columns)
        if missing or not {"correct", "p_pos"} & set(table.columns):
            raise ValueError(f"the {name} table needs patient_id, is_pos and correct or p_pos columns; "
                             f"it has {sorted(table.columns)}")
    same = ["patient_id", "is_pos", *(["path"] if {"path"} <= set(first) & set(second) else [])]
    if len(first) != len(second) or any((first[c].to_numpy() != second[c].to_numpy()).any() for c in same):
        raise ValueError(f"a paired comparison needs the same cells in the same order ({', '.join(same)} "
                         "equal row by row)")
