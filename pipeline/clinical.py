"""Clinical evaluation: patient-bootstrap confidence intervals, an operating point
chosen on validation, patient-level diagnosis, and calibration.

The figures are scikit-learn's definitions; the bootstrap's own (counts, ranks) are computed
here, tested equal to scikit-learn's. This module decides *what* to compute (resampling
patients, not cells, because cells of one patient are correlated).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm

CELL_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "sensitivity",
                "specificity", "ppv", "npv", "f1")


def binary_metrics(is_pos: np.ndarray, p_pos: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Cell-level figures for the positive class at ``threshold``.

    The threshold figures come from the four confusion counts, the AUCs from ranks (the
    bootstrap calls this thousands of times: scikit-learn's per-call checks took most of
    ``evaluate``'s bootstrap). NaN where a figure is undefined (a class absent, nothing called).
    """
    is_pos, p_pos = np.asarray(is_pos).astype(bool), np.asarray(p_pos)
    pred = p_pos >= threshold
    tp, fp = float(np.sum(pred & is_pos)), float(np.sum(pred & ~is_pos))
    fn, tn = float(np.sum(~pred & is_pos)), float(np.sum(~pred & ~is_pos))
    two = 0 < tp + fn < len(is_pos)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": (tp + tn) / len(is_pos),
        "balanced_accuracy": (sens + spec) / 2 if two else np.nan,
        "roc_auc": _roc_auc(is_pos, p_pos) if two else np.nan,
        "pr_auc": _average_precision(is_pos, p_pos) if two else np.nan,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else np.nan


def _roc_auc(is_pos: np.ndarray, p_pos: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic, ties at half (scikit-learn's trapezoids)."""
    n_pos = int(is_pos.sum())
    n_neg = len(is_pos) - n_pos
    return float((rankdata(p_pos)[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(is_pos: np.ndarray, p_pos: np.ndarray) -> float:
    """Precision at each distinct score, from the highest, weighted by the recall it adds
    (scikit-learn's average precision)."""
    order = np.argsort(-p_pos, kind="stable")
    last = np.r_[np.flatnonzero(np.diff(p_pos[order])), len(order) - 1]  # each score's last cell
    tp = np.cumsum(is_pos[order])[last]
    return float(np.sum(np.diff(tp, prepend=0) / tp[-1] * tp / (last + 1)))


def bootstrap_ci(is_pos: np.ndarray, p_pos: np.ndarray, groups: np.ndarray, threshold: float,
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Point estimate and percentile CI of each cell metric, resampling whole patients."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    draws = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        draws.append(binary_metrics(is_pos[idx], p_pos[idx], threshold))
    boot = pd.DataFrame(draws)
    alpha = (1 - level) / 2
    point = binary_metrics(is_pos, p_pos, threshold)
    return pd.DataFrame({
        "value": pd.Series(point),
        "ci_low": boot.quantile(alpha, numeric_only=True),
        "ci_high": boot.quantile(1 - alpha, numeric_only=True),
    }).loc[list(CELL_METRICS)]


def threshold_for_sensitivity(is_pos: np.ndarray, p_pos: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (chosen on validation)."""
    fpr, tpr, thr = skm.roc_curve(is_pos, p_pos)
    ok = np.flatnonzero(tpr >= target)
    return float(min(thr[ok[0]], 1.0)) if len(ok) else 0.0


def patient_level(groups: np.ndarray, is_pos: np.ndarray, p_pos: np.ndarray, cell_threshold: float,
                  patient_threshold: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per patient: share of cells called positive and a diagnosis; patient sens/spec.

    A patient is truly positive when any of their cells is labelled positive, and
    is called positive when the share of positive calls reaches ``patient_threshold``.
    """
    frame = pd.DataFrame({"patient_id": groups, "truth": is_pos,
                          "called": (p_pos >= cell_threshold).astype(int)})
    per = frame.groupby("patient_id").agg(cells=("truth", "size"), positive_cells=("truth", "sum"),
                                          called_fraction=("called", "mean")).reset_index()
    per["infected"] = (per["positive_cells"] > 0).astype(int)
    per["diagnosis"] = (per["called_fraction"] >= patient_threshold).astype(int)
    summary = {
        "patients": len(per),
        "patient_sensitivity": skm.recall_score(per["infected"], per["diagnosis"], zero_division=np.nan),
        "patient_specificity": skm.recall_score(1 - per["infected"], 1 - per["diagnosis"],
                                                zero_division=np.nan),
        "patient_accuracy": skm.accuracy_score(per["infected"], per["diagnosis"]),
    }
    return per, {k: float(v) for k, v in summary.items()}


def expected_calibration_error(is_pos: np.ndarray, p_pos: np.ndarray, bins: int = 15) -> tuple[float, pd.DataFrame]:
    """ECE over equal-width bins of the positive probability, and the reliability table."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p_pos, edges[1:-1]), 0, bins - 1)
    table = pd.DataFrame({"bin": which, "p": p_pos, "y": is_pos}).groupby("bin").agg(
        confidence=("p", "mean"), frequency=("y", "mean"), count=("y", "size")).reset_index()
    ece = float((table["count"] * (table["confidence"] - table["frequency"]).abs()).sum() / len(p_pos))
    return ece, table


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising validation log loss of ``softmax(log p / T)``."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(probs, 1e-12, 1))

    def nll(t: float) -> float:
        return skm.log_loss(labels, apply_temperature_logp(logp, t), labels=list(range(probs.shape[1])))

    return float(minimize_scalar(nll, bounds=(0.05, 20), method="bounded").x)


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """Probabilities rescaled by temperature ``t`` (1 = unchanged)."""
    return apply_temperature_logp(np.log(np.clip(probs, 1e-12, 1)), t)


def apply_temperature_logp(logp: np.ndarray, t: float) -> np.ndarray:
    z = logp / t
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)
