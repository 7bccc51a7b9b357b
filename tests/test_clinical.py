"""clinical: patient bootstrap, operating point, patient level, calibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import clinical


def _data(seed=0, n_patients=12, cells=40):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i}" for i in range(n_patients)], cells)
    is_pos = (rng.random(len(groups)) < 0.5).astype(int)
    p = np.clip(is_pos * 0.6 + rng.normal(0.2, 0.2, len(groups)), 0, 1)
    return groups, is_pos, p


def test_bootstrap_ci_brackets_the_estimate_and_resamples_patients():
    groups, y, p = _data()
    ci = clinical.bootstrap_ci(y, p, groups, 0.5, n_boot=200)
    assert list(ci.index) == list(clinical.CELL_METRICS)
    assert ((ci["ci_low"] <= ci["value"] + 1e-9) & (ci["value"] <= ci["ci_high"] + 1e-9)).all()
    # One patient only: every resample is that patient, so the interval collapses.
    one = clinical.bootstrap_ci(y[:40], p[:40], groups[:40], 0.5, n_boot=50)
    assert np.allclose(one["ci_low"], one["value"]) and np.allclose(one["ci_high"], one["value"])


def test_operating_point_reaches_target_sensitivity_on_validation():
    _, y, p = _data(1)
    thr = clinical.threshold_for_sensitivity(y, p, 0.98)
    assert skm.recall_score(y, p >= thr) >= 0.98
    assert thr < 0.5  # more sensitive than the default threshold on this data


def test_patient_level_diagnosis():
    groups = np.array(["A"] * 10 + ["B"] * 10)
    y = np.array([1] * 3 + [0] * 7 + [0] * 10)
    p = np.array([0.9] * 2 + [0.1] * 8 + [0.7] * 1 + [0.1] * 9)
    per, summary = clinical.patient_level(groups, y, p, 0.5, patient_threshold=0.15)
    assert per.set_index("patient_id")["called_fraction"].to_dict() == {"A": 0.2, "B": 0.1}
    assert per["diagnosis"].tolist() == [1, 0] and per["infected"].tolist() == [1, 0]
    assert summary["patient_sensitivity"] == 1 and summary["patient_specificity"] == 1


def test_ece_and_temperature_scaling():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)  # calibrated by construction
    ece, table = clinical.expected_calibration_error(y, p)
    assert ece < 0.02 and table["count"].sum() == 20000
    probs = np.stack([1 - p, p], 1)
    over = clinical.apply_temperature(probs, 0.3)  # an overconfident model
    t = clinical.fit_temperature(over, y)
    assert t == pytest.approx(1 / 0.3, rel=0.1)
    assert skm.log_loss(y, clinical.apply_temperature(over, t)) < skm.log_loss(y, over)


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_from_counts_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    is_pos = rng.integers(0, 2, 200)
    p_pos = np.clip(is_pos * 0.3 + rng.random(200) * 0.7, 0, 1)
    if seed % 2:  # ties, as TTA means and unanswered cells (0.5) make them: the ranks' half-counts
        p_pos = np.where(rng.random(200) < 0.3, 0.5, np.round(p_pos, 1))
    for threshold in (0.2, 0.5, 0.9, 1.1):  # 1.1: nothing called positive
        pred = (p_pos >= threshold).astype(int)
        got = clinical.binary_metrics(is_pos, p_pos, threshold)
        want = {"accuracy": skm.accuracy_score(is_pos, pred),
                "balanced_accuracy": skm.balanced_accuracy_score(is_pos, pred),
                "roc_auc": skm.roc_auc_score(is_pos, p_pos),
                "pr_auc": skm.average_precision_score(is_pos, p_pos),
                "sensitivity": skm.recall_score(is_pos, pred, zero_division=np.nan),
                "specificity": skm.recall_score(1 - is_pos, 1 - pred, zero_division=np.nan),
                "ppv": skm.precision_score(is_pos, pred, zero_division=np.nan),
                "npv": skm.precision_score(1 - is_pos, 1 - pred, zero_division=np.nan),
                "f1": skm.f1_score(is_pos, pred, zero_division=np.nan)}
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert np.isclose(got[key], value, rtol=0, atol=1e-12, equal_nan=True), (threshold, key)
    one_class = clinical.binary_metrics(np.ones(5, int), np.full(5, 0.7))
    assert np.isnan(one_class["roc_auc"]) and np.isnan(one_class["specificity"])
    assert one_class["sensitivity"] == 1.0
