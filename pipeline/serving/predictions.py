"""The scored table: one row per image (label, probabilities, error), its Arrow schema, the
Parquet writer and the patient-level calls. Every entry point (pyfunc, batch scoring, the
champion re-score) writes this one format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.console import progress
from pipeline.files import atomic_path
from pipeline.serving.screening import ERROR, OK, REJECTED

if TYPE_CHECKING:
    from pipeline.serving.inference import Predictor

log = logging.getLogger(__name__)


def score_rows(predictor: "Predictor", pixels: np.ndarray, errors: Sequence[str | None],
               rejects: Sequence[str | None], tta: bool | None = None,
               threshold: float | None = None, stats: np.ndarray | None = None) -> pd.DataFrame:
    """The one path from decoded, resized images to rows, for every entry point.

    ``errors`` (unreadable) and ``rejects`` (refused by the input checks) per image; the
    others go to the model, and one whose out-of-distribution score passes the model's
    threshold (or ``threshold``, an override) is rejected too. Only ``ok`` rows carry a label.
    ``stats``: the images' appearance statistics, when decoding computed them already.
    """
    n = len(errors)
    status = [ERROR if errors[i] else REJECTED if rejects[i] else OK for i in range(n)]
    reason = [errors[i] or rejects[i] or None for i in range(n)]
    go = [i for i in range(n) if status[i] == OK]
    answered = pixels[go]  # one copy of the images the model sees, for both of its passes
    probs, feats = predictor.assess_resized(answered, tta) if go else (None, np.zeros((0, 0)))
    ood = np.full(n, np.nan)
    ood[go] = predictor.ood_scores(feats, answered, None if stats is None else stats[go])
    limit = threshold or 1.0
    full = np.full((n, len(predictor.meta.class_names)), np.nan)
    for j, i in enumerate(go):
        if ood[i] > limit:
            status[i] = REJECTED
            reason[i] = (f"out of distribution: score {ood[i]:.2f}, above {limit:g}: unlike the "
                         "cells the model was trained on")
        else:
            full[i] = probs[j]
    return format_predictions(full, status, reason, ood, predictor.meta.class_names)


def format_predictions(probs: np.ndarray, status: Sequence[str], reason: Sequence[str | None],
                       ood: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per input: label, its probability and the per-class probabilities (``ok`` rows
    only: NaN otherwise), ``status``, ``reason`` (why rejected, or the error), ``ood_score``,
    and ``error`` (the reason of an ``error`` row; kept for readers of the older table)."""
    n, k = len(status), len(class_names)
    ok = np.array([s == OK for s in status], dtype=bool)
    full = np.where(ok[:, None], np.asarray(probs, np.float64).reshape(n, k), np.nan)
    labels = np.array([None] * n, dtype=object)
    if ok.any():
        labels[ok] = np.asarray(class_names)[full[ok].argmax(1)]
    out = pd.DataFrame({"predicted_label": labels,
                        "probability": np.where(ok, np.nan_to_num(full).max(1) if k else np.nan, np.nan)})
    for j, name in enumerate(class_names):
        out[f"prob_{name}"] = full[:, j]
    out["status"] = list(status)
    out["reason"] = list(reason)
    out["ood_score"] = np.asarray(ood, np.float64)
    out["error"] = [r if s == ERROR else None for s, r in zip(status, reason)]
    return out


def predictions_schema(class_names: Sequence[str]) -> pa.Schema:
    """The scored table (:func:`format_predictions` plus path and model version),
    declared before any batch exists.

    Every batch is written against it, so a batch whose images all decoded (an
    all-null ``error``) or all failed (all-null labels) cannot fix a column's type.
    """
    return pa.schema([
        ("path", pa.string()),
        ("predicted_label", pa.string()),
        ("probability", pa.float64()),
        *[(f"prob_{name}", pa.float64()) for name in class_names],
        ("status", pa.string()),
        ("reason", pa.string()),
        ("ood_score", pa.float64()),
        ("error", pa.string()),
        ("model_version", pa.string()),
    ])


def patients_path(output: str | Path) -> Path:
    """Where the per-patient summary of ``output`` goes."""
    output = Path(output)
    return output.with_name(f"{output.stem}_patients.parquet")


def patient_summary(predictions: pd.DataFrame, group_of: Callable[[str], str] | None,
                    class_names: Sequence[str]) -> pd.DataFrame:
    """Per patient: cells, cells that failed, cells rejected, the share of each class among
    the cells answered (one column per class of the model), and ``called``: false when most
    of the patient's cells were rejected or failed, so such a patient is never called healthy
    on the few cells left. ``group_of`` None: no patients, an empty table."""
    def safe(path: str) -> str | None:
        try:
            return group_of(path) if group_of is not None else None
        except ValueError:
            return None

    frame = predictions.assign(patient_id=predictions["path"].map(safe))
    unknown = int(frame["patient_id"].isna().sum())
    if unknown and group_of is not None:
        log.warning("%d images have no patient id in their file name; left out of the summary", unknown)
    frame = frame.dropna(subset=["patient_id"])
    if frame.empty:  # no patients (a dataset without them): the table's columns, no rows
        columns = ["patient_id", "cells", "errors", "rejected", *(f"fraction_{c}" for c in class_names), "called"]
        return pd.DataFrame({c: [] for c in columns})
    grouped = frame.groupby("patient_id")
    out = pd.DataFrame({"cells": grouped.size(), "errors": grouped["error"].count(),
                        "rejected": grouped["status"].apply(lambda s: int((s == REJECTED).sum()))})
    out.index.name = "patient_id"
    for label in class_names:
        out[f"fraction_{label}"] = grouped["predicted_label"].apply(
            lambda s, lab=label: float((s == lab).sum() / s.notna().sum()) if s.notna().any() else np.nan)
    answered = grouped["predicted_label"].apply(lambda s: int(s.notna().sum()))
    out["called"] = answered > out["cells"] / 2
    return out.reset_index()


def write_predictions(batches: Iterable[pd.DataFrame], output: Path, schema: pa.Schema,
                      total: int | None = None) -> tuple[int, int, float | None]:
    """Stream prediction batches into one Parquet file of ``schema``, atomically.

    Returns:
        (rows written, rows with an error, ``time.perf_counter()`` of the first row written)
    """
    import time

    n = n_err = 0
    first = None
    with atomic_path(output) as tmp, progress(total=total, desc="score", unit="img") as bar, \
            pq.ParquetWriter(tmp, schema) as writer:
        for batch in batches:
            missing = set(schema.names) - set(batch.columns)
            if missing:
                raise ValueError(f"prediction batch lacks the columns {sorted(missing)}")
            writer.write_table(pa.Table.from_pandas(batch[schema.names], schema=schema,
                                                    preserve_index=False))
            first = first or time.perf_counter()
            n += len(batch)
            n_err += int(batch["error"].notna().sum())
            bar.update(len(batch))
    return n, n_err, first
