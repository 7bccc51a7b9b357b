"""compare: the selection rule applied to paired differences on the same external cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.selection.compare import compare, render, verdict


def _cells(folder, p_pos: np.ndarray, is_pos: np.ndarray, patients: np.ndarray, rejected=None):
    """``pipeline validate``'s cells.parquet: ``rejected`` cells have no answer (p_pos 0.5)."""
    rejected = np.zeros(len(p_pos), bool) if rejected is None else rejected
    folder.mkdir(parents=True)
    pd.DataFrame({"patient_id": patients, "is_pos": is_pos, "status": np.where(rejected, "rejected", "ok"),
                  "p_model": np.where(rejected, np.nan, p_pos), "p_pos": np.where(rejected, 0.5, p_pos),
                  "correct": (p_pos >= 0.3) == is_pos}).to_parquet(folder / "cells.parquet")  # operating point
    return folder


def _diff(low: float, high: float) -> pd.DataFrame:
    return pd.DataFrame({"ci_low": [low, -0.01], "ci_high": [high, 0.01]}, index=["accuracy", "roc_auc"])


def test_the_rule():
    assert verdict(_diff(0.001, 0.02)) == "better: becomes the default"
    assert verdict(_diff(-0.02, -0.001)) == "worse"
    assert verdict(_diff(-0.01, 0.01)) == "indistinguishable: the default stays"
    assert verdict(_diff(-0.01, 0.01), cost_ratio=1.6) == "as good and 1.5x cheaper: becomes the default"
    assert verdict(_diff(-0.01, 0.01), cost_ratio=1.4) == "indistinguishable: the default stays"


def _good_and_flaky(seed: int):
    """600 cells of 20 patients; a model right on all, and one that misses 90 positive cells of
    6 patients."""
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"P{i}" for i in range(20)], 30)
    is_pos = np.tile([True, False], 300)
    good = np.where(is_pos, 0.9, 0.1) + rng.normal(0, 0.02, 600)
    flaky = good.copy()
    flaky[np.isin(patients, ["P1", "P2", "P3", "P4", "P5", "P6"]) & is_pos] = 0.3
    return patients, is_pos, good, flaky


def test_a_candidate_right_on_every_patient_beats_one_wrong_on_some(tmp_path):
    patients, is_pos, good, flaky = _good_and_flaky(0)
    base = _cells(tmp_path / "default", flaky, is_pos, patients)
    table = compare(base, {"same": base, "better": _cells(tmp_path / "better", good, is_pos, patients)}, n_boot=300)
    same, better = table.set_index("candidate").loc["same"], table.set_index("candidate").loc["better"]
    assert same["accuracy_difference"] == 0 and same["verdict"] == "indistinguishable: the default stays"
    assert abs(better["accuracy_difference"] - 90 / 600) < 1e-12 and better["accuracy_ci_low"] > 0
    assert better["verdict"] == "better: becomes the default"
    text = render(table, "pipeline compare ...")
    assert "| better | 1.000 (0.850) | +15.00 (" in text


def test_a_cell_without_an_answer_is_an_error_at_0_5_whatever_its_label(tmp_path):
    patients, is_pos, good, _ = _good_and_flaky(1)
    rejected = np.isin(patients, ["P1", "P2"]) & (np.arange(600) % 4 < 2)  # 15 positive, 15 negative cells
    base = _cells(tmp_path / "default", good, is_pos, patients)
    table = compare(base, {"rejects": _cells(tmp_path / "rejects", good, is_pos, patients, rejected)}, n_boot=200)
    row = table.iloc[0]
    assert row["accuracy"] == pytest.approx(1 - 30 / 600) and row["accuracy_default"] == 1.0
    assert row["accuracy_difference"] == pytest.approx(-30 / 600)


def test_every_seed_is_reported_with_the_mean_and_the_spread(tmp_path):
    import json

    from pipeline.selection.compare import render_seeds, seeds_summary

    def figure(v):
        return {"value": v, "ci_low": v - 0.01, "ci_high": v + 0.01}

    folders = {}
    for seed, acc in (("1", 0.95), ("2", 0.93)):
        folder = tmp_path / seed / "reports" / "external"
        folder.mkdir(parents=True)
        metrics = {m: figure(acc) for m in ("accuracy", "roc_auc", "sensitivity", "specificity")}
        (folder / "external.json").write_text(json.dumps({
            "cells": {"threshold_0.5": metrics, "operating_point": metrics},
            "patients": {"threshold_0.5": {"accuracy": figure(0.9)}}, "operating_threshold": 0.1,
            "answers": {"unanswered_share": 0.001, "patients": 42, "cells": 5065},
            "about": {"date": "2026-12-04", "archive": "pool-report.zip"}}))
        folders[seed] = folder
    (tmp_path / "1" / "metrics").mkdir()
    (tmp_path / "1" / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": 0.97, "n": 865}))
    summary = seeds_summary(folders)
    assert summary["mean"]["cells_at_threshold.accuracy"] == 0.94
    assert round(summary["spread"]["cells_at_threshold.accuracy"], 6) == 0.02
    assert summary["seeds"]["1"]["test_split"] == {"accuracy": 0.97, "n": 865}
    assert summary["seeds"]["2"]["test_split"] is None
    text = render_seeds(summary, "cmd")
    assert "| 1 | 0.950 (0.940-0.960) |" in text and "| 2 | 0.930 (0.920-0.940) |" in text
    assert "| mean | 0.940 |" in text


def test_seeds_are_paired_by_position_and_their_differences_averaged(tmp_path):
    patients, is_pos, good, flaky = _good_and_flaky(1)
    defaults = [_cells(tmp_path / f"default-{s}", flaky, is_pos, patients) for s in (1, 2)]
    candidate = [_cells(tmp_path / "cand-1", good, is_pos, patients), _cells(tmp_path / "cand-2", flaky, is_pos, patients)]
    row = compare(defaults, {"half": candidate}, n_boot=300).iloc[0]
    # seed 1 gains 90 of 600 cells, seed 2 nothing: the mean of the two paired differences
    assert row["seeds"] == 2 and abs(row["accuracy_difference"] - 0.5 * 90 / 600) < 1e-12
    assert abs(row["accuracy"] - (1.0 + 0.85) / 2) < 1e-12 and abs(row["accuracy_default"] - 0.85) < 1e-12
    # every replicate draws the same patients for all four models: the CI brackets the mean
    # difference and lies above zero (every patient the candidate gains on is drawn for both seeds)
    assert 0 < row["accuracy_ci_low"] < row["accuracy_difference"] < row["accuracy_ci_high"]
    assert "each recipe trained with 2 seeds" in render(compare(defaults, {"half": candidate}, n_boot=50), "cmd")
    with pytest.raises(ValueError, match="as many seeds on each side: 1 and 2"):
        compare(defaults, {"one": candidate[:1]}, n_boot=10)
