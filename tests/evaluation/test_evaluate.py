"""evaluate: the whole evaluation on a prepared synthetic dataset, and Grad-CAM."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.config import EvaluateConfig
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.explain import grad_cam, worst_errors
from pipeline.serving.inference import load_checkpoint


def test_evaluate_writes_metrics_plots_and_report(checkpoint, prepared_synthetic, tmp_path):
    cfg = EvaluateConfig(bootstrap=50, gradcam_images=4, temperature_scaling=True)
    result = evaluate(cfg, checkpoint, prepared_synthetic, tmp_path / "m.json", tmp_path / "plots",
                      tmp_path / "reports" / "evaluate.md", model_name="malaria-test", dataset="malaria")
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("accuracy", "roc_auc", "pr_auc", "ppv", "npv", "ece", "operating_threshold",
                "patient_sensitivity",
                "accuracy_ci_low", "accuracy_ci_high", "per_class", "confusion_matrix"):
        assert key in metrics, key
    assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
    for name in ("roc.csv", "pr.csv", "confusion.csv", "reliability.csv", "roc.png", "pr.png",
                 "reliability.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0, name
    report = result.report.read_text()
    print(report)
    header = report.split("\n## ")[0]
    assert "# Evaluation report: malaria-test, test split" in header
    assert "malaria-test (baseline_cnn, 32 px" in header and "synthetic demo images" in header
    assert "| Evaluated | 20" in header and "test split of" in header
    for section in ("Cells at threshold 0.5", "Cells at the operating point", "Patients (",
                    "Calibration", "Per class"):
        assert f"\n## {section}" in report, section
    for row in ("| PPV (precision)", "| NPV", "| Sensitivity (recall of Parasitized)"):
        assert report.count(row) == 2, row  # threshold 0.5 and the operating point, once each
    assert report.count("| ROC AUC") == 1  # threshold-free: not repeated at the operating point
    assert "nan" not in report.lower().replace("nanoseconds", "")
    rows = [line for line in report.splitlines() if line.startswith("| P")]
    assert rows and not any(line.startswith("|  0 |") for line in report.splitlines())
    assert "| parasitized " in report or "| uninfected " in report  # words, not 1/0
    assert "](../plots/roc.png)" in report


def test_report_links_resolve_in_the_mlflow_layout(tmp_path):
    from pipeline.evaluation.report import artifact_dirs

    report, plot = tmp_path / "reports" / "evaluate.md", tmp_path / "plots" / "evaluate" / "roc.png"
    dirs = artifact_dirs([plot, report], report)
    assert dirs == {plot.resolve(): "plots/evaluate", report.resolve(): "reports"}
    beside = tmp_path / "evaluate.md"  # the report at the top: MLflow's top folder, not "."
    assert artifact_dirs([plot, beside], beside) == {plot.resolve(): "plots/evaluate", beside.resolve(): None}


def test_undefined_patient_specificity_is_said_in_words():
    import pandas as pd

    from pipeline.evaluation.report import BinaryTables, _patient_sentence

    patients = pd.DataFrame({"patient_id": ["P1", "P2"], "cells": [3, 4], "positive_cells": [1, 2],
                             "called_fraction": [0.3, 0.5], "infected": [1, 1], "diagnosis": [1, 1]})
    tables = BinaryTables("Parasitized", "Uninfected", None, None, 0.5, "", patients,
                          {"patient_accuracy": 1.0, "patient_sensitivity": 1.0,
                           "patient_specificity": float("nan")}, 0.1, None)
    sentence = _patient_sentence(tables)
    assert "Patient specificity is not defined here: none of the 2 patients is uninfected" in sentence
    assert "nan" not in sentence


def test_grad_cam_maps_and_worst_errors(checkpoint):
    model, meta = load_checkpoint(checkpoint)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    cams = grad_cam(model, meta, images, np.array([0, 1, 0]))
    assert cams.shape == (3, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    assert worst_errors(labels, probs, 5).tolist() == [1, 2]
