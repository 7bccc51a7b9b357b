"""Test-split evaluation: metrics with patient-bootstrap CIs, operating point, patient-level
results, calibration, plots (CSV for ``dvc plots``, PNG for people) and one report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from pipeline import clinical
from pipeline.config import EvaluateConfig
from pipeline.data.prepared import PreparedData
from pipeline.evaluation.report import About, BinaryTables, artifact_dirs, write_report
from pipeline.files import write_json
from pipeline.metrics import HEADLINE_METRICS, classification_metrics
from pipeline.plots import write_plots
from pipeline.serving.inference import BATCH_SIZE, Predictor
from pipeline.training import run_notes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    plots: dict[str, Path]
    report: Path


@dataclass(frozen=True)
class SplitPredictions:
    labels: np.ndarray
    probs: np.ndarray
    groups: np.ndarray
    images: np.ndarray


def predict_split(model_path: str | Path, prepared: str | Path, split: str,
                  batch_size: int = BATCH_SIZE, tta: bool = False) -> tuple[np.ndarray, np.ndarray, list[str], Predictor]:
    """Labels and predicted probabilities for one prepared split."""
    predictor = Predictor.from_checkpoint(model_path, batch_size=batch_size, tta=tta)
    pred = _split(predictor, PreparedData(prepared), split)
    return pred.labels, pred.probs, list(predictor.meta.class_names), predictor


def _split(predictor: Predictor, data: PreparedData, split: str) -> SplitPredictions:
    """Predictions, labels and patient ids of one split, after checking the class names."""
    if list(predictor.meta.class_names) != data.class_names:
        raise ValueError(f"model classes {predictor.meta.class_names} differ from the data's "
                         f"{data.class_names}")
    part = data.split(split)
    return SplitPredictions(part.labels, predictor.predict_resized(part.images), part.groups, part.images)


def evaluate(cfg: EvaluateConfig, model_path: str | Path, prepared: str | Path, metrics_path: str | Path,
             plots_dir: str | Path, report_path: str | Path, run_id: str | None = None,
             model_name: str = "", dataset: str = "") -> EvaluateResult:
    """Score the validation and test splits; write metrics JSON, plots and a markdown report
    (about ``model_name``, trained on ``dataset`` in MLflow run ``run_id``)."""
    data = PreparedData(prepared)
    predictor = Predictor.from_checkpoint(model_path, batch_size=cfg.batch_size, tta=cfg.tta)
    classes = list(predictor.meta.class_names)
    val, test = _split(predictor, data, "val"), _split(predictor, data, "test")
    temperature = 1.0
    if cfg.temperature_scaling:
        temperature = clinical.fit_temperature(val.probs, val.labels)
        val = SplitPredictions(val.labels, clinical.apply_temperature(val.probs, temperature), val.groups, val.images)
        test = SplitPredictions(test.labels, clinical.apply_temperature(test.probs, temperature), test.groups, test.images)
    positive = cfg.positive_class if cfg.positive_class in classes else None
    metrics = classification_metrics(test.labels, test.probs, classes, positive)
    metrics.update(tta=cfg.tta, temperature=temperature, per_class=_per_class(test, classes))
    binary = None
    if len(classes) == 2:
        metrics_binary, binary = _binary(cfg, val, test, classes, positive or classes[0])
        metrics.update(metrics_binary)
    plots = write_plots(test.labels, test.probs, classes, positive, Path(plots_dir))
    plots.update(_gradcam(cfg, predictor, test, classes, Path(plots_dir)))
    write_json(metrics_path, metrics)
    about = _about(cfg, predictor, data, test, model_name, dataset, run_id, binary)
    report = write_report(Path(report_path), about, metrics, binary, plots)
    log.info("test: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    if run_id:
        _log_to_mlflow(run_id, metrics, [*plots.values(), report], report)
    return EvaluateResult(metrics, plots, report)


def _about(cfg: EvaluateConfig, predictor: Predictor, data: PreparedData, test: SplitPredictions,
           model_name: str, dataset: str, run_id: str | None, binary: BinaryTables | None) -> About:
    meta = predictor.meta
    origin = ("**synthetic demo images, not real cells**" if data.synthetic else "real images")
    points = (f"threshold 0.5 and the operating point {binary.threshold:.3f} (validation, "
              f"sensitivity >= {cfg.target_sensitivity}); " if binary else "")
    return About(
        name=model_name or "model",
        model=f"{model_name or 'model'} ({meta.model}, {meta.image_size} px, classes "
              f"{', '.join(meta.class_names)})",
        run=(f"`{run_id}`; the `register` stage gives it a version (models/register.json)"
             if run_id else "not logged to MLflow"),
        data=f"{dataset or 'dataset'}: {origin}; test split of {len(test.labels)} cells from "
             f"{len(np.unique(test.groups))} patients that training never saw",
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        settings=f"{points}TTA {'on' if cfg.tta else 'off'}; temperature "
                 f"{'fitted on validation' if cfg.temperature_scaling else 'not fitted'}")


def _per_class(test: SplitPredictions, classes: list[str]) -> dict[str, dict[str, float]]:
    rep = skm.classification_report(test.labels, test.probs.argmax(1), labels=list(range(len(classes))),
                                    target_names=classes, output_dict=True, zero_division=0)
    return {c: {k: float(v) for k, v in rep[c].items()} for c in classes}


def _binary(cfg: EvaluateConfig, val: SplitPredictions, test: SplitPredictions, classes: list[str],
            positive: str) -> tuple[dict[str, float], BinaryTables]:
    """Operating point, bootstrap CIs, patient level and calibration for a binary task."""
    pos = classes.index(positive)
    v_pos, t_pos = (val.labels == pos).astype(int), (test.labels == pos).astype(int)
    v_p, t_p = val.probs[:, pos], test.probs[:, pos]
    thr = clinical.threshold_for_sensitivity(v_pos, v_p, cfg.target_sensitivity)
    at_05, at_op = (clinical.bootstrap_ci(t_pos, t_p, test.groups, t, cfg.bootstrap, cfg.ci_level)
                    for t in (0.5, thr))
    patients, patient_summary = clinical.patient_level(test.groups, t_pos, t_p, thr, cfg.patient_threshold)
    ece, reliability = clinical.expected_calibration_error(t_pos, t_p)
    out = {"pr_auc": float(at_05.at["pr_auc", "value"]), "ppv": float(at_05.at["ppv", "value"]),
           "npv": float(at_05.at["npv", "value"]), "ece": ece, "operating_threshold": thr,
           "operating_sensitivity": float(at_op.at["sensitivity", "value"]),
           "operating_specificity": float(at_op.at["specificity", "value"]), **patient_summary}
    for metric in HEADLINE_METRICS:
        out[f"{metric}_ci_low"] = float(at_05.at[metric, "ci_low"])
        out[f"{metric}_ci_high"] = float(at_05.at[metric, "ci_high"])
    ci_title = (f"({cfg.ci_level:.0%} CI, bootstrap over {len(np.unique(test.groups))} patients "
                f"x {cfg.bootstrap})")
    negative = classes[1 - pos]
    return out, BinaryTables(positive, negative, at_05, at_op, thr, ci_title, patients,
                             patient_summary, cfg.patient_threshold, reliability)


def _gradcam(cfg: EvaluateConfig, predictor: Predictor, test: SplitPredictions, classes: list[str],
             out: Path) -> dict[str, Path]:
    from pipeline.evaluation.explain import grad_cam, worst_errors
    from pipeline.plots import gradcam_grid

    idx = worst_errors(test.labels, test.probs, cfg.gradcam_images)
    if not len(idx):  # no errors: drop a grid left by an earlier run
        (out / "gradcam_worst_errors.png").unlink(missing_ok=True)
        return {}
    images = np.asarray(test.images[idx])
    pred = test.probs[idx].argmax(1)
    cams = grad_cam(predictor.model, predictor.meta, images, pred)
    titles = [f"true {classes[t]}\npred {classes[p]} {test.probs[i, p]:.2f}"
              for i, t, p in zip(idx, test.labels[idx], pred)]
    return {"gradcam_png": gradcam_grid(images, cams, titles, out / "gradcam_worst_errors.png")}


def _log_to_mlflow(run_id: str, metrics: dict, files: list[Path], report: Path) -> None:
    import mlflow

    from pipeline.tracking import setup_mlflow

    setup_mlflow()
    with mlflow.start_run(run_id=run_id) as run:
        note = run.data.tags.get(run_notes.NOTE_TAG)
        if note:
            mlflow.set_tag(run_notes.NOTE_TAG, run_notes.with_test_figures(note, metrics))
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in metrics.items()  # tta: 1.0 or 0.0
                            if isinstance(v, (bool, float)) and np.isfinite(v)})
        for path, folder in artifact_dirs(files, report).items():
            mlflow.log_artifact(str(path), artifact_path=folder)
