"""What MLflow shows a person about a training run: its name, its description (what was
trained, on which data and split, then the test figures), and the data as MLflow inputs.

Names and words only: metric names and the tags the registry reads are not touched here.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.prepared import PreparedData
from pipeline.metrics import HEADLINE_METRICS
from pipeline.tracking import dvc_experiment

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI


def run_name(model: str, regime: str, image_size: int, epochs: int) -> str:
    """``<DVC experiment or workspace>/<model>-<regime>-<size>px-<epochs>ep``: which
    experiment and which recipe, readable in the MLflow run list."""
    experiment = dvc_experiment()
    return f"{experiment}/{model}-{regime}-{image_size}px-{epochs}ep"


def data_words(data: PreparedData, dataset: str) -> str:
    """The dataset, said as what it is (synthetic demo images are called synthetic)."""
    kind = "SYNTHETIC demo images, not real cells" if data.synthetic else "real images"
    return f"{dataset} ({kind})"


def run_description(cfg: Any, data: PreparedData, dataset: str) -> str:
    """The training run's description before evaluation: what, on what, which split."""
    rows = {s: data.rows(s) for s in ("train", "val", "test")}
    split = "; ".join(f"{s} {len(r)} cells / {r['patient_id'].nunique()} patients" for s, r in rows.items())
    return (f"Trains {cfg.model} ({cfg.regime}) at {data.image_size} px for up to {cfg.epochs} "
            f"epochs, classes {', '.join(data.class_names)}.\n\n"
            f"Data: {data_words(data, dataset)}, dataset id `{data.dataset_id()}`.\n\n"
            f"Split by patient (no patient in two splits): {split}.\n\n"
            "Test figures: added by the evaluate stage.")


def with_test_figures(description: str, metrics: dict[str, Any]) -> str:
    """``description`` with its last paragraph replaced by the test figures and their CIs."""
    figures = []
    for key in HEADLINE_METRICS:
        if isinstance(metrics.get(key), float):
            ci = (f" (95% CI {metrics[key + '_ci_low']:.3f} to {metrics[key + '_ci_high']:.3f})"
                  if key + "_ci_low" in metrics else "")
            figures.append(f"{key} {metrics[key]:.4f}{ci}")
    head = description.rsplit("\n\nTest figures", 1)[0]
    cells, patients = (int(metrics[k]) if isinstance(metrics.get(k), (int, float)) else "?"
                       for k in ("n", "patients"))
    return (f"{head}\n\nTest figures on {cells} cells of {patients} unseen patients: "
            f"{'; '.join(figures)}.")


def log_inputs(data: PreparedData, dataset: str) -> None:
    """The training and validation rows (path, label, patient) as MLflow dataset inputs,
    so the run's Datasets tab names the data and its digest."""
    import warnings

    import mlflow

    for split, context in (("train", "training"), ("val", "validation")):
        rows = data.rows(split)[["path", "label", "patient_id"]].reset_index(drop=True)
        with warnings.catch_warnings():  # MLflow registers its local source twice, then warns
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset_input = mlflow.data.from_pandas(rows, source=data.root.as_uri(),
                                                    name=f"{dataset}-{split}")
        mlflow.log_input(dataset_input, context=context)
