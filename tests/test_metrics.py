"""metrics: binary figures against hand-computed values; multi-class; the better-than rule."""

from __future__ import annotations

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


def test_multiclass_metrics_are_macro():
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, probs, ["a", "b", "c"], positive_class=None)
    assert m["accuracy"] == pytest.approx(0.75)
    assert len(m["confusion_matrix"]) == 3 and 0 < m["roc_auc"] <= 1


def test_is_better_respects_direction():
    assert is_better("roc_auc", 0.9, 0.8) and not is_better("roc_auc", 0.8, 0.8)
    assert is_better("log_loss", 0.1, 0.2) and not is_better("log_loss", 0.3, 0.2)
