"""Patient-grouped cross-validation: folds, fold folders, pooled out-of-fold figures and a
label-noise audit. No Ray here: :mod:`pipeline.selection.trials` runs the folds as trials.

The test patients never enter a fold: k folds are drawn over the training and validation
patients, stratified by the patient's label (infected or not), every cell of a patient in
one fold. Fold ``f`` trains on the other folds (its validation patients carved from them,
by patient) and predicts fold ``f``, so every cell gets exactly one out-of-fold (OOF)
probability from a model that never saw its patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from pipeline import clinical
from pipeline.config import ConfigError
from pipeline.data.prepared import PreparedData, write_resplit
from pipeline.data.split import one_fold

POOL = ("train", "val")  # the splits cross-validation draws its patients from
OOF_COLUMNS = ("path", "patient_id", "label", "fold", "p_pos")


def patient_labels(rows: pd.DataFrame, positive_class: str) -> pd.Series:
    """1 for a patient with any positive cell, else 0 (the patient-level truth)."""
    return rows.assign(pos=rows["label"] == positive_class).groupby("patient_id")["pos"].any().astype(int)


def assign_folds(rows: pd.DataFrame, k: int, seed: int, positive_class: str) -> pd.Series:
    """Fold number of every patient of ``rows`` (index: patient_id)."""
    patients = patient_labels(rows, positive_class)
    if len(patients) < k:
        raise ConfigError(f"crossval.folds={k} needs at least {k} patients; the training and "
                          f"validation splits hold {len(patients)}")
    # Stratify only where each patient label has k patients; else plain shuffled folds.
    strata = patients.to_numpy() if patients.value_counts().min() >= k else np.zeros(len(patients))
    folds = pd.Series(-1, index=patients.index, name="fold")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(patients)), strata)):
        folds.iloc[held] = f
    return folds


@dataclass(frozen=True)
class Fold:
    """One fold: the split of every pool cell (``train``/``val`` to learn, ``test`` held out)."""

    number: int
    splits: pd.Series  # path -> split


def make_folds(data: PreparedData, k: int, seed: int, val_ratio: float, positive_class: str,
               exclude: frozenset[str] = frozenset()) -> list[Fold]:
    """The ``k`` folds of ``data``'s training and validation patients.

    Validation patients are carved from the training folds (about ``val_ratio`` of the
    pool's cells). Cells in ``exclude`` (manifest paths) are left out of training and
    validation, never out of the held-out fold.
    """
    rows = data.manifest[data.manifest["split"].isin(POOL)]
    fold_of = rows["patient_id"].map(assign_folds(rows, k, seed, positive_class))
    classes = {c: i for i, c in enumerate(data.class_names)}
    out = []
    for f in range(k):
        held = (fold_of == f).to_numpy()
        rest = rows[~held]
        val_idx = one_fold(rest["label"].map(classes).to_numpy(), rest["patient_id"].to_numpy(),
                           val_ratio / (1 - 1 / k), seed + 1000 + f)
        split = pd.Series("train", index=rest["path"].to_numpy())
        split.iloc[val_idx] = "val"
        split = split[~split.index.isin(exclude)]
        out.append(Fold(f, pd.concat([split, pd.Series("test", index=rows.loc[held, "path"].to_numpy())])))
    return out


def write_fold(data: PreparedData, fold: Fold, dest: str | Path) -> PreparedData:
    """The fold as a prepared folder: train/val to learn from, its held-out cells as test."""
    return write_resplit(data, fold.splits, dest)


def pooled(oof: pd.DataFrame, positive_class: str, patient_threshold: float, n_boot: int,
           level: float, seed: int = 0) -> dict[str, float]:
    """Pooled OOF figures at 0.5 with patient-bootstrap CIs, and patient-level figures."""
    is_pos, p = (oof["label"] == positive_class).to_numpy(), oof["p_pos"].to_numpy()
    table = clinical.bootstrap_ci(is_pos, p, oof["patient_id"].to_numpy(), 0.5, n_boot, level, seed)
    out = {"cells": len(oof), "patients": int(oof["patient_id"].nunique())}
    for metric, row in table.iterrows():
        out |= {metric: float(row["value"]), f"{metric}_ci_low": float(row["ci_low"]),
                f"{metric}_ci_high": float(row["ci_high"])}
    _, patients = clinical.patient_level(oof["patient_id"].to_numpy(), is_pos, p, 0.5, patient_threshold)
    return out | {k: v for k, v in patients.items() if k != "patients"}


def per_fold(oof: pd.DataFrame, positive_class: str) -> pd.DataFrame:
    """Cell-level figures of each fold at 0.5, one row per fold."""
    rows = []
    for f, part in oof.groupby("fold"):
        m = clinical.binary_metrics((part["label"] == positive_class).to_numpy(), part["p_pos"].to_numpy())
        rows.append({"fold": int(f), "cells": len(part), "patients": part["patient_id"].nunique(), **m})
    return pd.DataFrame(rows)


def mean_sd(folds: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation over folds of every figure."""
    cols = [c for c in clinical.CELL_METRICS if c in folds]
    return {c: (float(folds[c].mean()), float(folds[c].std(ddof=1)) if len(folds) > 1 else 0.0)
            for c in cols}


def label_issues(oof: pd.DataFrame, positive_class: str) -> pd.DataFrame:
    """Cells whose OOF probability contradicts their label, confident-learning style.

    Per class, the threshold is the mean probability of that class over the cells labelled
    with it (Northcutt et al., 2021); a cell is listed when the *other* class's probability
    reaches the other class's threshold. Sorted by the probability of its own label, lowest
    first. Binary labels only (the OOF table keeps the positive probability).
    """
    is_pos = (oof["label"] == positive_class).to_numpy()
    p = oof["p_pos"].to_numpy()
    t_pos = p[is_pos].mean() if is_pos.any() else 1.0
    t_neg = (1 - p[~is_pos]).mean() if (~is_pos).any() else 1.0
    flagged = np.where(is_pos, 1 - p >= t_neg, p >= t_pos)
    own = np.where(is_pos, p, 1 - p)
    out = oof.assign(p_own_label=own)[flagged]
    return out.sort_values("p_own_label", kind="stable").reset_index(drop=True)


def issues_per_patient(oof: pd.DataFrame, issues: pd.DataFrame) -> pd.DataFrame:
    """Listed cells per patient, with the patient's cell count and share."""
    cells = oof.groupby("patient_id").size().rename("cells")
    listed = issues.groupby("patient_id").size().rename("listed")
    table = pd.concat([cells, listed], axis=1).fillna(0).astype(int)
    table["share"] = table["listed"] / table["cells"]
    return table.sort_values(["share", "listed"], ascending=False).reset_index()
