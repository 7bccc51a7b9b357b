"""Test-split evaluation: DVC metrics and plots, logged to the training run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from pipeline.config import EvaluateConfig  # noqa: E402
from pipeline.inference import Predictor  # noqa: E402
from pipeline.metrics import classification_metrics  # noqa: E402
from pipeline.prepare import load_split  # noqa: E402
from pipeline.utils import atomic_path, write_json  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    plots: dict[str, Path]


def predict_split(model_path: str | Path, prepared: str | Path, split: str,
                  batch_size: int = 256, tta: bool = False) -> tuple[np.ndarray, np.ndarray, list[str], Predictor]:
    """Labels and predicted probabilities for one prepared split."""
    predictor = Predictor.from_checkpoint(model_path, batch_size=batch_size, tta=tta)
    images, labels, class_names = load_split(prepared, split)
    if list(predictor.meta.class_names) != class_names:
        raise ValueError(f"model classes {predictor.meta.class_names} differ from the data's {class_names}")
    return labels, predictor.predict_resized(images), class_names, predictor


def evaluate(cfg: EvaluateConfig, model_path: str | Path, prepared: str | Path,
             metrics_path: str | Path, plots_dir: str | Path, run_id: str | None = None) -> EvaluateResult:
    """Score the test split, write metrics JSON and ROC / confusion-matrix plots."""
    labels, probs, class_names, predictor = predict_split(model_path, prepared, "test",
                                                          cfg.batch_size, cfg.tta)
    positive = cfg.positive_class if cfg.positive_class in class_names else None
    metrics = classification_metrics(labels, probs, class_names, positive)
    metrics["tta"] = cfg.tta
    write_json(metrics_path, metrics)
    plots = write_plots(labels, probs, class_names, positive, Path(plots_dir))
    log.info("test: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    if run_id:
        _log_to_mlflow(run_id, metrics, plots)
    return EvaluateResult(metrics, plots)


def write_plots(labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                positive: str | None, out: Path) -> dict[str, Path]:
    """ROC curve and confusion data as CSV (for ``dvc plots``) and PNG (for people)."""
    out.mkdir(parents=True, exist_ok=True)
    pos = class_names.index(positive) if positive else len(class_names) - 1
    fpr, tpr, thr = skm.roc_curve(labels == pos, probs[:, pos])
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})
    confusion = pd.DataFrame({"actual": np.array(class_names)[labels],
                              "predicted": np.array(class_names)[probs.argmax(1)]})
    paths = {"roc": out / "roc.csv", "confusion": out / "confusion.csv",
             "roc_png": out / "roc.png", "confusion_png": out / "confusion_matrix.png"}
    for key, frame in (("roc", roc), ("confusion", confusion)):
        with atomic_path(paths[key]) as tmp:
            frame.to_csv(tmp, index=False)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC = {skm.auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=f"ROC ({class_names[pos]})")
    ax.legend(loc="lower right")
    _save(fig, paths["roc_png"])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    skm.ConfusionMatrixDisplay.from_predictions(confusion["actual"], confusion["predicted"],
                                                labels=class_names, ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (test)")
    _save(fig, paths["confusion_png"])
    return paths


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _log_to_mlflow(run_id: str, metrics: dict, plots: dict[str, Path]) -> None:
    import mlflow

    from pipeline.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
        for path in plots.values():
            mlflow.log_artifact(str(path), artifact_path="evaluate")
