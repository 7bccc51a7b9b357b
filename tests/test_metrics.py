"""metrics: binary figures against hand-computed values; multi-class; the better-than rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import classification_metrics, is_better


def test_binary_metrics_match_a_hand_count():
    classes = ["Parasitized", "Uninfected"]
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p_pos = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.6, 0.4, 0.05])
    probs = np.stack([p_pos, 1 - p_pos], 1)
    m = classification_metrics(y, probs, classes, positive_class="Parasitized")
    # predicted positive: 0.9, 0.8, 0.6 -> TP=2, FN=1, FP=1, TN=4
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["roc_auc"] == pytest.approx(13 / 15)  # pairs ranked right: 13 of 15
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # the probability each cell gave its true class: 0.9, 0.8, 0.3, then 1 - p_pos
    true_class = [0.9, 0.8, 0.3, 0.8, 0.9, 0.4, 0.6, 0.95]
    assert m["log_loss"] == pytest.approx(-sum(math.log(p) for p in true_class) / 8)
    assert m["n"] == 8


def test_multiclass_metrics_are_macro():
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3  # 13/15 on the predicted class, 1/15 on each other
    m = classification_metrics(y, probs, ["a", "b", "c"], positive_class=None)
    # predicted 0, 1, 2, 1: only the last cell (a "c" taken for a "b") is wrong
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(3 / 4) and m["n"] == 4
    # recall a 1/1, b 1/1, c 1/2; specificity a 3/3, b 2/3 (the "c" called "b"), c 2/2
    assert m["sensitivity"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert m["specificity"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    # F1 = 2PR/(P+R): a 1; b precision 1/2, recall 1 -> 2/3; c precision 1, recall 1/2 -> 2/3
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # one-vs-rest AUC, counting (positive, negative) pairs, a tie as half:
    #   a: its one cell scores 13/15 against 1/15 for all 3 others       -> 3/3
    #   b: cell 1 (13/15) beats cells 0 and 2 (1/15), ties cell 3 (13/15) -> 2.5/3
    #   c: cell 2 (13/15) beats cells 0 and 1, cell 3 (1/15) ties both    -> 3/4
    assert m["roc_auc"] == pytest.approx((1 + 2.5 / 3 + 3 / 4) / 3)  # = 31/36
    assert m["roc_auc"] == pytest.approx(_ovr_auc_by_pairs(y, probs))
    assert m["log_loss"] == pytest.approx(-(3 * math.log(13 / 15) + math.log(1 / 15)) / 4)


def _ovr_auc_by_pairs(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC from its definition: the share of (positive, negative) pairs
    the positive outranks, ties counting half."""
    aucs = []
    for k in range(probs.shape[1]):
        pos, neg = probs[y == k, k], probs[y != k, k]
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        aucs.append(wins / (len(pos) * len(neg)))
    return sum(aucs) / len(aucs)


def test_is_better_respects_direction():
    assert is_better("roc_auc", 0.9, 0.8) and not is_better("roc_auc", 0.8, 0.8)
    assert is_better("log_loss", 0.1, 0.2) and not is_better("log_loss", 0.3, 0.2)
