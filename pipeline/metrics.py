"""Classification metrics from scikit-learn, binary (with a positive class) or multi-class."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

# Metrics where lower is better; everything else reported here is higher-is-better.
LOWER_IS_BETTER = frozenset({"loss", "log_loss", "ece"})
# The test figures evaluate gives patient-bootstrap CIs, which people compare first: the
# run's description, the version tags and the short metrics view all show these.
HEADLINE_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                           positive_class: str | None = None) -> dict[str, float | list]:
    """Accuracy, ROC AUC, sensitivity, specificity, F1 and the confusion matrix.

    With two classes, sensitivity/specificity/F1 are for ``positive_class`` (the
    first class if not given); with more, they are macro averages and AUC is
    one-vs-rest.
    """
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(1)
    k = len(class_names)
    labels = list(range(k))
    out: dict[str, float | list] = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "log_loss": skm.log_loss(y_true, probs, labels=labels),
        "n": int(len(y_true)),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if k == 2:
        pos = class_names.index(positive_class) if positive_class else 0
        is_pos = (y_true == pos).astype(int)
        pred_pos = (y_pred == pos).astype(int)
        out["roc_auc"] = _safe_auc(is_pos, probs[:, pos])
        out["sensitivity"] = skm.recall_score(is_pos, pred_pos, zero_division=0)
        out["specificity"] = skm.recall_score(1 - is_pos, 1 - pred_pos, zero_division=0)
        out["f1"] = skm.f1_score(is_pos, pred_pos, zero_division=0)
    else:
        out["roc_auc"] = _safe_auc(y_true, probs, multi_class="ovr", average="macro", labels=labels)
        out["sensitivity"] = skm.recall_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
        out["specificity"] = float(np.mean(_specificities(np.array(out["confusion_matrix"]))))
        out["f1"] = skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    return {key: float(v) if isinstance(v, (float, np.floating)) else v for key, v in out.items()}


def _safe_auc(y, score, **kwargs) -> float:
    try:
        return skm.roc_auc_score(y, score, **kwargs)
    except ValueError:  # a single class present: AUC is undefined
        return float("nan")


def _specificities(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    return tn / np.maximum(tn + fp, 1)


def is_better(metric: str, new: float, old: float, margin: float = 0.0) -> bool:
    """Whether ``new`` beats ``old`` on ``metric`` by more than ``margin`` (NaN never wins)."""
    if np.isnan(new):
        return False
    if np.isnan(old):
        return True
    return new < old - margin if metric in LOWER_IS_BETTER else new > old + margin
