"""run_notes: what MLflow shows a person about a training run."""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.data.prepared import PreparedData
from pipeline.training import run_notes


def test_run_name_names_the_dvc_experiment_and_the_recipe(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_notes.run_name("efficientnet_lite0", "finetune_all", 96, 3) == \
        "workspace/efficientnet_lite0-finetune_all-96px-3ep"
    monkeypatch.setenv("DVC_EXP_NAME", "lying-bots")
    assert run_notes.run_name("baseline_cnn", "scratch", 64, 5) == "lying-bots/baseline_cnn-scratch-64px-5ep"


def test_description_says_data_split_and_then_test_figures_once(prepared_synthetic):
    data = PreparedData(prepared_synthetic)
    note = run_notes.run_description(TrainConfig(), data, "malaria")
    assert "SYNTHETIC demo images, not real cells" in note  # the fixture's archive is synthetic
    assert "Split by patient" in note and note.endswith("added by the evaluate stage.")
    metrics = {"n": 32.0, "patients": 2.0, "accuracy": 0.9, "accuracy_ci_low": 0.8,
               "accuracy_ci_high": 0.95, "roc_auc": 0.97}
    once = run_notes.with_test_figures(note, metrics)
    twice = run_notes.with_test_figures(once, {**metrics, "accuracy": 0.91})  # evaluate re-run
    assert once.count("Test figures") == 1 and twice.count("Test figures") == 1
    assert "on 32 cells of 2 unseen patients: accuracy 0.9100 (95% CI 0.800 to 0.950)" in twice
