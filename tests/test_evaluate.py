"""evaluate: the whole evaluation on a prepared synthetic dataset, and Grad-CAM."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.config import EvaluateConfig
from pipeline.evaluate import evaluate
from pipeline.explain import grad_cam, worst_errors
from pipeline.inference import load_checkpoint


def test_evaluate_writes_metrics_plots_and_report(checkpoint, prepared_synthetic, tmp_path):
    cfg = EvaluateConfig(bootstrap=50, gradcam_images=4, temperature_scaling=True)
    result = evaluate(cfg, checkpoint, prepared_synthetic, tmp_path / "m.json", tmp_path / "plots",
                      tmp_path / "reports" / "evaluate.md")
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("accuracy", "roc_auc", "pr_auc", "ece", "operating_threshold", "patient_sensitivity",
                "accuracy_ci_low", "accuracy_ci_high", "per_class", "confusion_matrix"):
        assert key in metrics, key
    assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
    for name in ("roc.csv", "pr.csv", "confusion.csv", "reliability.csv", "roc.png", "pr.png",
                 "reliability.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0, name
    report = result.report.read_text()
    assert "Patient level" in report and "operating point" in report and "](../plots/roc.png)" in report


def test_grad_cam_maps_and_worst_errors(checkpoint):
    model, meta = load_checkpoint(checkpoint)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    cams = grad_cam(model, meta, images, np.array([0, 1, 0]))
    assert cams.shape == (3, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    assert worst_errors(labels, probs, 5).tolist() == [1, 2]
