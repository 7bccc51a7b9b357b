"""The served model: its input contract (:data:`CONTRACT`), the MLflow
``PythonModel``, the output table and how it is logged (models from code).

The pyfunc carries the trained checkpoint and the part of this package it runs
(:func:`packaged_code`), and applies the same decoding, resizing and
normalisation as training, so
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)`` works in
any fresh Python process. Batch scoring and the champion re-score use the same
output format.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd

from pipeline.config import ScoreConfig
from pipeline.data.images import resize
from pipeline.imports import PACKAGE, PACKAGE_DIR, module_closure, module_file
from pipeline.serving.predictions import score_rows
from pipeline.serving.screening import InputLimits, decode_screened, screen

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
INPUT_COLUMN = "image"

# The contract, in one table: README and the registered model's description show it.
CONTRACT = """\
| entry point | accepts | returns / refuses |
|---|---|---|
| `mlflow.pyfunc.load_model(uri).predict(df)` and `mlflow models serve` | a DataFrame with one column `image` of encoded image bytes (any format Pillow reads: PNG, JPEG, TIFF incl. 16-bit and float, BMP, WebP, GIF: the first frame of a multi-frame file; over REST base64 strings in JSON, decoded by MLflow from the signature); params `tta` (bool, default true, as `score.tta`: the validated figures had it; false: 8x faster) and `ood_threshold` (float, default 0: the model's own) | one row per image: `predicted_label`, `probability`, `prob_<class>`, `status` (`ok`, `rejected`, `error`), `reason`, `ood_score`, `error`; only `ok` rows carry a label and probabilities: an image the input checks refuse (size or aspect far outside the training cells', mostly transparent, near-uniform) or whose out-of-distribution score passes the model's threshold is `rejected` with the reason, bytes that are not a readable image are `error`; anything else (no `image` column, values that are not bytes, arrays, paths, None) is refused as a whole, by MLflow's signature check or with an error that says what to pass (HTTP 400 over REST) |
| `load_model(uri).unwrap_python_model().predict_arrays(images)` | decoded images: a list of `HxWx3` uint8 RGB arrays, or one `NxHxWx3` uint8 batch | the same table, through the same checks; a single 3-D array, float arrays, other channel counts, None or a string are refused with an error that says what to pass |
"""


class ModelInputError(ValueError):
    """The input is not what the model accepts; the message says what to pass."""


def decode_encoded(column: Sequence[Any], size: int, limits: InputLimits | None
                   ) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """Decode a column of encoded image bytes: pixels at ``size``, errors and reject reasons.

    A value that is not bytes makes the whole request malformed (refused, HTTP 400
    over REST); bytes that are not a readable image get a per-row error, so one bad
    file never stops a batch.

    Raises:
        ModelInputError: on a value that is not bytes, saying what to pass.
    """
    pixels = np.zeros((len(column), size, size, 3), np.uint8)
    errors: list[str | None] = []
    rejects: list[str | None] = []
    for i, item in enumerate(column):
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise ModelInputError(f"row {i} of the '{INPUT_COLUMN}' column holds {type(item).__name__}, "
                                  "not encoded image bytes: pass each file's bytes (over REST, "
                                  "base64-encoded in JSON)")
        resized, error, rejected = decode_screened(bytes(item), size, limits)
        if resized is not None:
            pixels[i] = resized
        errors.append(error)
        rejects.append(rejected)
    return pixels, errors, rejects


def check_arrays(images: Any) -> list[np.ndarray]:
    """Decoded images as a list of ``HxWx3`` uint8 arrays; refuse anything ambiguous.

    Raises:
        ModelInputError: saying what was given and what to pass instead.
    """
    what = "pass a list of HxWx3 uint8 RGB arrays or one NxHxWx3 uint8 batch"
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            raise ModelInputError(f"got one array of shape {images.shape}: is it one image or a batch? "
                                  f"{what} (one image: [image])")
        if images.ndim != 4:
            raise ModelInputError(f"got an array of shape {images.shape}; {what}")
        images = list(images)
    elif not isinstance(images, (list, tuple)):  # None, a string, bytes, a PIL image, ...
        raise ModelInputError(f"got {type(images).__name__}; {what} (encoded files go to predict() "
                              f"as a DataFrame with an '{INPUT_COLUMN}' column)")
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise ModelInputError(f"item {i} is {type(img).__name__}, not an array; {what}")
        if img.dtype != np.uint8:
            raise ModelInputError(f"item {i} has dtype {img.dtype}; {what} (0..255; a float image "
                                  "scaled 0..1 would be misread as near-black)")
        if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
            raise ModelInputError(f"item {i} has shape {img.shape}; {what}")
    return list(images)


def signature(class_names: Sequence[str]):
    """The MLflow signature: the input column, the ``tta`` param and the output table."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec(DataType.string, "predicted_label", required=False),
               ColSpec(DataType.double, "probability", required=False),
               *[ColSpec(DataType.double, f"prob_{c}", required=False) for c in class_names],
               ColSpec(DataType.string, "status"),
               ColSpec(DataType.string, "reason", required=False),
               ColSpec(DataType.double, "ood_score", required=False),
               ColSpec(DataType.string, "error", required=False)]
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
                          outputs=Schema(outputs),
                          params=ParamSchema([ParamSpec("tta", DataType.boolean, ScoreConfig.tta),
                                              ParamSpec("ood_threshold", DataType.double, 0.0)]))


class CellClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc: encoded images in, one row per image out (label, probabilities, error)."""

    def load_context(self, context) -> None:
        from pipeline.serving.inference import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """The signature's entry point: a DataFrame with an ``image`` column of encoded bytes;
        params ``tta`` and ``ood_threshold`` (0: the threshold recorded with the model)."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            raise ModelInputError(f"pass a DataFrame with an '{INPUT_COLUMN}' column of encoded image "
                                  f"bytes, got {type(model_input).__name__}")
        p = self.predictor
        pixels, errors, rejects = decode_encoded(model_input[INPUT_COLUMN], p.meta.image_size, p.limits)
        params = params or {}
        return score_rows(p, pixels, errors, rejects, bool(params.get("tta", ScoreConfig.tta)),
                          float(params.get("ood_threshold") or 0) or None)

    def predict_arrays(self, images: Any, tta: bool = ScoreConfig.tta, ood_threshold: float | None = None
                       ) -> pd.DataFrame:
        """Decoded images (see :func:`check_arrays`) to one row per image, through the same
        checks and reject option as encoded ones."""
        arrays = check_arrays(images)
        p = self.predictor
        pixels = np.stack([resize(a, p.meta.image_size) for a in arrays]) if arrays else \
            np.zeros((0, p.meta.image_size, p.meta.image_size, 3), np.uint8)
        return score_rows(p, pixels, [None] * len(arrays), [screen(a, p.limits) for a in arrays], tta,
                          ood_threshold)


def packaged_code(dest: Path) -> Path:
    """Copy the package modules the served model imports into ``dest/pipeline``, in their
    sub-packages.

    Only this closure travels with the model, so a change elsewhere in the
    package (plots, reports) does not change, or retrain, the model.
    """
    target = dest / PACKAGE
    for module in sorted(module_closure([__name__, "pipeline.serving.inference"])):
        source = module_file(module)
        copy = target / source.relative_to(PACKAGE_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    return target


# The file MLflow loads as the model ("models from code"): it only declares the pyfunc.
MODEL_CODE = '''"""The model file MLflow runs on load: the pyfunc instance, nothing else."""
from mlflow.models import set_model

from pipeline.serving.pyfunc import CellClassifier

set_model(CellClassifier())
'''


def log_model(checkpoint: str | Path, example: np.ndarray, class_names: Sequence[str]) -> str:
    """Log the pyfunc, as code (:data:`MODEL_CODE`), to the active run; return its URI."""
    import io
    import tempfile

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(example).save(buf, format="PNG")
    with tempfile.TemporaryDirectory() as d:
        model_code = Path(d) / "served_model.py"
        model_code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(model_code),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(packaged_code(Path(d)))],
            signature=signature(class_names),
            input_example=pd.DataFrame({INPUT_COLUMN: [buf.getvalue()]}),
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["torch", "torchvision", "timm", "numpy", "pandas", "pillow", "albumentations",
            "opencv-python-headless", "scikit-learn", "mlflow", "pyarrow"]
    return [f"{p}=={version(p)}" for p in pkgs]


def checkpoint_of(model_uri: str) -> Path:
    """A local copy of a logged model's checkpoint: what its pyfunc's ``load_context`` builds
    the predictor from. Read as a file rather than by loading the pyfunc, which would put the
    model's own copy of this package on the caller's import path (and took 6.6 s, against
    0.15 s for the checkpoint, on the 2-core machine)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    checkpoints = sorted((local / "artifacts").rglob("*.pt"))
    if not checkpoints:
        raise ValueError(f"{model_uri} carries no checkpoint; was it logged by this pipeline?")
    return checkpoints[0]


def checkpoint_header(checkpoint: str | Path) -> tuple[dict[str, Any], InputLimits | None]:
    """Metadata (image size, class names, model) and input limits of a checkpoint, in one read."""
    from pipeline.serving.inference import input_limits, read_checkpoint

    state = read_checkpoint(checkpoint)
    return state["meta"], input_limits(state)
