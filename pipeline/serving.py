"""The served model: its input decoding, the MLflow ``PythonModel``, the output
table and how it is logged.

The pyfunc carries the trained checkpoint and the part of this package it runs
(:func:`packaged_code`), and applies the same decoding, resizing and
normalisation as training, so
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)`` works in
any fresh Python process. Batch scoring and the champion re-score use the same
output format.
"""

from __future__ import annotations

import base64
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.images import ImageDecodeError, load_rgb
from pipeline.imports import PACKAGE, module_closure, module_file
from pipeline.metrics import classification_metrics
from pipeline.prepared import PreparedData

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


def decode_inputs(model_input: Any) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Images from the accepted input forms, with a per-item error instead of raising.

    Accepted: a DataFrame with an ``image`` column of encoded bytes or base64
    strings (the REST form), a list of ``HxWx3`` arrays, encoded bytes or base64
    strings, or one ``NxHxWx3`` array.
    """
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError("input DataFrame needs an 'image' column of encoded image bytes")
        items = list(model_input["image"])
    else:
        items = list(model_input)
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for item in items:
        try:
            images.append(_to_image(item))
            errors.append(None)
        except (ImageDecodeError, ValueError, TypeError) as exc:
            images.append(None)
            errors.append(str(exc))
    return images, errors


def _to_image(item: Any) -> np.ndarray:
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = np.repeat(item[..., None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] not in (3, 4):
            raise ValueError(f"array of shape {item.shape} is not an HxWx3 image")
        return np.ascontiguousarray(item[..., :3]).astype(np.uint8, copy=False)
    if isinstance(item, str):
        item = base64.b64decode(item, validate=True)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return load_rgb(bytes(item))
    raise TypeError(f"cannot read an image from {type(item).__name__}")


class CellClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc: raw RGB images in, one row per image out (label, probabilities, error)."""

    def load_context(self, context) -> None:
        from pipeline.inference import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        images, errors = decode_inputs(model_input)
        ok = [i for i, img in enumerate(images) if img is not None]
        probs = self.predictor.predict([images[i] for i in ok])
        return format_predictions(probs, ok, errors, self.predictor.meta.class_names)


def format_predictions(probs: np.ndarray, ok: list[int], errors: list[str | None],
                       class_names: Sequence[str]) -> pd.DataFrame:
    """One row per input: predicted label, its probability, per-class probabilities, error."""
    n, k = len(errors), len(class_names)
    full = np.full((n, k), np.nan, dtype=np.float64)
    full[ok] = probs
    labels = np.array([None] * n, dtype=object)
    labels[ok] = np.asarray(class_names)[probs.argmax(1)] if len(ok) else []
    out = pd.DataFrame({"predicted_label": labels, "probability": full.max(1) if k else []})
    for j, name in enumerate(class_names):
        out[f"prob_{name}"] = full[:, j]
    out["error"] = errors
    return out


def predictions_schema(class_names: Sequence[str]) -> pa.Schema:
    """The scored table (:func:`format_predictions` plus path and model version),
    declared before any batch exists.

    Every batch is written against it, so a batch whose images all decoded (an
    all-null ``error``) or all failed (all-null labels) cannot fix a column's type.
    """
    return pa.schema([
        ("path", pa.string()),
        ("predicted_label", pa.string()),
        ("probability", pa.float64()),
        *[(f"prob_{name}", pa.float64()) for name in class_names],
        ("error", pa.string()),
        ("model_version", pa.string()),
    ])


def packaged_code(dest: Path) -> Path:
    """Copy the package modules the served model imports into ``dest/pipeline``.

    Only this closure travels with the model, so a change elsewhere in the
    package (plots, reports) does not change, or retrain, the model.
    """
    target = dest / PACKAGE
    target.mkdir(parents=True)
    for module in sorted(module_closure([__name__, "pipeline.inference"])):
        shutil.copyfile(module_file(module), target / module_file(module).name)
    return target


def log_model(checkpoint: str | Path, example: np.ndarray) -> str:
    """Log the pyfunc model to the active run; return its model URI."""
    import io
    import tempfile

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(example).save(buf, format="PNG")
    input_example = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CloudPickle.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=CellClassifier(),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(packaged_code(Path(d)))],
            input_example=input_example,
            # No schema: it would reject a list of HxWx3 arrays of different sizes;
            # decode_inputs checks every input form and reports bad items per row.
            signature=False,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "torchvision", "timm", "numpy", "pandas", "pillow", "albumentations",
            "scikit-learn", "mlflow", "pyarrow"]
    return [f"{p}=={version(p)}" for p in pkgs]


def model_meta(model_uri: str) -> dict[str, Any]:
    """Metadata (image size, class names) of a logged model, from its checkpoint.

    Read from the file rather than by loading the pyfunc, which would put the
    model's own copy of this package on the caller's import path.
    """
    import torch

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    checkpoints = sorted((local / "artifacts").rglob("*.pt"))
    if not checkpoints:
        raise ValueError(f"{model_uri} carries no checkpoint; was it logged by this pipeline?")
    return torch.load(checkpoints[0], map_location="cpu", weights_only=True)["meta"]


def metrics_on_split(model_uri: str, data: PreparedData, split: str,
                     positive_class: str | None) -> dict[str, Any]:
    """Metrics of a logged model on the original image files of a prepared split."""
    rows = data.rows(split)
    images = [(data.images_dir / p).read_bytes() for p in rows["path"]]
    preds = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
    classes = data.class_names
    labels = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    return classification_metrics(labels, probs, classes,
                                  positive_class if positive_class in classes else None)
