"""summary: the 120-column views of metrics and experiments."""

from __future__ import annotations

from pipeline.evaluation.summary import WIDTH, experiments_view, headline, metrics_view

METRICS = {"n": 865, "patients": 4.0, "accuracy": 0.978, "accuracy_ci_low": 0.948,
           "accuracy_ci_high": 1.0, "roc_auc": 0.9982, "sensitivity": 0.9749,
           "specificity": 0.985, "ppv": 0.9932, "npv": 0.946, "patient_accuracy": 1.0,
           "patient_specificity": float("nan"), "operating_threshold": 0.2,
           "operating_sensitivity": 0.99, "operating_specificity": 0.9, "log_loss": 0.07}


def _exp(name, epochs, lr, accuracy):
    params = {"params.yaml": {"data": {"train": {"epochs": epochs, "lr": lr, "model": "efficientnet_lite0",
                                                 "a_very_long_parameter_name_nobody_changed": 1}}}}
    metrics = {"metrics/evaluate.json": {"data": {**METRICS, "accuracy": accuracy}}}
    return {"rev": "f2875fd0", "name": name, "data": {"params": params, "metrics": metrics}}


def test_headline_is_one_line_with_whole_counts():
    line = headline(METRICS)
    assert line.startswith("test (865 cells, 4 patients): acc 0.9780, auc 0.9982")
    assert "\n" not in line


def test_metrics_view_fits_and_leads_with_the_headline():
    view = metrics_view(METRICS, {"best_epoch": 3, "val_acc": 0.93, "val_loss": 0.16})
    lines = view.splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert lines[0] == "test split: 865 cells, 4 patients" and "accuracy" in lines[2]
    assert "0.9480 to 1.0000" in view and "nan" not in view


def test_experiments_view_shows_changed_params_then_metrics_within_the_width():
    shown = [{"rev": "workspace", "name": None, **_exp(None, 3, 0.001, 0.978)},
             {**_exp(None, 3, 0.001, 0.978), "rev": "a1b2c3d4e5", "name": "main",
              "experiments": [{"revs": [_exp("lying-bots", 5, 0.001, 0.981)]},
                              {"revs": [_exp("eager-fawn", 3, 0.0005, 0.97)]}]}]
    shown[0]["rev"] = "workspace"
    view = experiments_view(shown)
    lines = view.splitlines()
    assert max(map(len, lines)) <= WIDTH and len(lines) == 5
    header = lines[0].split()
    assert header[:3] == ["experiment", "train.epochs", "train.lr"] and header[3] == "acc"
    assert "a_very_long_parameter_name_nobody_changed" not in view and "train.model" not in view
    assert lines[1].split()[0] == "workspace" and "lying-bots" in view and "0.9810" in view
    narrow = experiments_view(shown, width=40)
    assert max(map(len, narrow.splitlines())) <= 40 and narrow.splitlines()[0].startswith("experiment")
