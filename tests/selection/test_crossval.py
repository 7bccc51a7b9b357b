"""crossval, selection, trials: patient folds, fold folders, pooled OOF figures, the label
audit, and real cross-validation trials through Ray Tune with MLflow child runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import clinical
from pipeline.config import ConfigError, from_dict
from pipeline.data.prepared import PreparedData
from pipeline.params import Params
from pipeline.selection import crossval
from pipeline.selection.report import images_of
from pipeline.selection.study import with_overrides
from tests.conftest import repo_params

POS = "Parasitized"


def _params(**change) -> Params:
    return from_dict(Params, repo_params(**change))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_keep_patients_whole_and_test_patients_out(prepared_synthetic, seed, tmp_path):
    data = PreparedData(prepared_synthetic)
    folds = crossval.make_folds(data, 3, seed, 0.15, POS)
    pool = data.manifest[data.manifest["split"].isin(crossval.POOL)]
    test_patients = set(data.rows("test")["patient_id"])
    patient = data.manifest.set_index("path")["patient_id"]
    held = pd.concat([f.splits[f.splits == "test"] for f in folds])
    assert sorted(held.index) == sorted(pool["path"])  # every pool cell held out exactly once
    fold_of = {}
    for f in folds:
        held_patients = set(patient[f.splits.index[f.splits == "test"]])
        for split in ("train", "val", "test"):
            assert not set(patient[f.splits.index[f.splits == split]]) & test_patients
        learn = {s: set(patient[f.splits.index[f.splits == s]]) for s in ("train", "val")}
        assert learn["train"] and learn["val"] and not learn["train"] & learn["val"]
        assert not (learn["train"] | learn["val"]) & held_patients
        for p in held_patients:
            assert fold_of.setdefault(p, f.number) == f.number  # no patient in two folds
    fold_data = crossval.write_fold(data, folds[0], tmp_path / "fold0")
    for split in ("train", "val", "test"):  # the fold folder holds the very same pixels
        rows = fold_data.rows(split)
        assert np.array_equal(np.asarray(fold_data.split(split).images),
                              images_of(data, rows["path"]))


def test_excluded_cells_leave_training_but_stay_held_out(prepared_synthetic):
    data = PreparedData(prepared_synthetic)
    pool = data.manifest[data.manifest["split"].isin(crossval.POOL)]["path"]
    exclude = frozenset(pool.iloc[::5])
    for fold in crossval.make_folds(data, 2, 0, 0.15, POS, exclude):
        learn = fold.splits[fold.splits != "test"]
        assert not set(learn.index) & exclude
    held = pd.concat([f.splits[f.splits == "test"] for f in crossval.make_folds(data, 2, 0, 0.15, POS, exclude)])
    assert exclude <= set(held.index)


def _oof(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i}" for i in range(12)], 20)
    label = np.where(rng.random(len(patients)) < 0.4, POS, "Uninfected")
    p = np.clip(np.where(label == POS, 0.8, 0.2) + rng.normal(0, 0.25, len(label)), 0, 1)
    return pd.DataFrame({"path": [f"c{i}.png" for i in range(len(label))], "patient_id": patients,
                         "label": label, "fold": np.arange(len(label)) % 3, "p_pos": p})


def test_pooled_figures_are_those_of_the_oof_table():
    oof = _oof()
    pooled = crossval.pooled(oof, POS, 0.1, 200, 0.95)
    is_pos = (oof["label"] == POS).to_numpy()
    direct = clinical.binary_metrics(is_pos, oof["p_pos"].to_numpy())
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        assert pooled[key] == pytest.approx(direct[key])
        assert pooled[f"{key}_ci_low"] <= pooled[key] <= pooled[f"{key}_ci_high"]
    folds = crossval.per_fold(oof, POS)
    assert list(folds["fold"]) == [0, 1, 2] and folds["cells"].sum() == len(oof)
    mean, sd = crossval.mean_sd(folds)["accuracy"]
    assert mean == pytest.approx(folds["accuracy"].mean()) and sd == pytest.approx(folds["accuracy"].std())


def test_label_issues_are_confident_contradictions_listed_per_patient():
    oof = pd.DataFrame({"path": list("abcdef"), "patient_id": ["x", "x", "y", "y", "z", "z"],
                        "label": [POS, POS, POS, "Uninfected", "Uninfected", "Uninfected"],
                        "fold": 0, "p_pos": [0.95, 0.9, 0.02, 0.05, 0.1, 0.97]})
    issues = crossval.label_issues(oof, POS)
    assert list(issues["path"]) == ["c", "f"]  # lowest own-label probability first
    assert issues["p_own_label"].tolist() == pytest.approx([0.02, 0.03])
    per = crossval.issues_per_patient(oof, issues).set_index("patient_id")
    assert per.loc["y", "listed"] == 1 and per.loc["z", "share"] == 0.5 and per.loc["x", "listed"] == 0


def test_overrides_are_checked_like_params_yaml():
    params = _params()
    changed = with_overrides(params, {"train.lr": 0.0003, "prepare.image_size": 64})
    assert changed.train.lr == 0.0003 and changed.prepare.image_size == 64
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(params, {"train.learning_rate": 0.1})
    with pytest.raises(ConfigError, match="evaluate.tta"):
        with_overrides(params, {"evaluate.tta": "often"})


def test_sweep_table_has_a_row_of_figures_per_configuration_and_a_failed_one_says_why():
    from pipeline.selection.report import sweep_table
    from pipeline.selection.study import ConfigResult

    oof = _oof()
    pooled = crossval.pooled(oof, POS, 0.1, 200, 0.95)
    ok = ConfigResult("ok", {}, _params(), oof, pooled, crossval.per_fold(oof, POS), wall_s=90.0)
    bad = ConfigResult("fast", {"train.lr": 1e10}, _params(), None,
                       failed=["fast fold 0: diverged", "fast fold 1: diverged"])
    lines = sweep_table([ok, bad]).splitlines()
    assert lines[0].startswith("| configuration | overrides | accuracy | AUC |") and len(lines) == 4
    figures = " | ".join(f"{pooled[k]:.3f} ({pooled[k + '_ci_low']:.3f}–{pooled[k + '_ci_high']:.3f})"
                         for k in ("accuracy", "roc_auc", "sensitivity", "specificity"))
    assert lines[2] == f"| ok | params.yaml | {figures} | {pooled['patient_accuracy']:.3f} | 1.5 |"
    assert lines[3] == ("| fast | `train.lr=10000000000.0` | failed: fast fold 0: diverged; fast fold 1: "
                        "diverged | | | | | |")


@pytest.mark.slow
def test_failed_trials_are_failed_child_runs_and_the_sweep_reports_them(
        prepared_synthetic, tracking_uri, ray_local, tmp_path):
    """A configuration that diverges (lr 1e10), 2 folds as Ray Tune trials. (Trials that train,
    their OOF table and report: the crossval stage in tests/test_demo.py.)"""
    import json

    import mlflow

    from pipeline.selection.report import sweep

    # One Ray Train worker a trial: the two trials run side by side on two cores (DDP across
    # workers is tested in tests/training).
    params = _params(dataset="malaria", train={"model": "baseline_cnn", "pretrained": False,
                                               "regime": "scratch", "epochs": 1, "system_metrics": False,
                                               "num_workers": 1},
                     crossval={"folds": 2, "seed": 0}, evaluate={"bootstrap": 100})
    [bad] = sweep(params, {"diverges": {"train.lr": 1e10}}, prepared_synthetic, None, tmp_path / "sweep",
                  tmp_path / "work")
    assert bad.oof is None and len(bad.failed) == 2
    assert all("diverged" in f for f in bad.failed), bad.failed
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| diverges | `train.lr=10000000000.0` | failed: diverges fold 0: " in table
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())[0]["failed"] == bad.failed
    runs = mlflow.search_runs(experiment_names=["malaria"], output_format="list")
    parent = [r for r in runs if r.info.run_name == "sweep-seed0"][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["sweep-seed0/diverges/fold0",
                                                        "sweep-seed0/diverges/fold1"]
    assert [r.info.status for r in children] == ["FAILED", "FAILED"]
    assert all("nan" in r.data.tags["diverged"] for r in children)
    assert "diverges fold 0" in parent.data.tags["failed_trials"]
    summary = [a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "sweep")]
    assert "sweep/sweep.md" in summary and "sweep/sweep.json" in summary
