"""The MLflow model: a pyfunc that takes raw images, and the champion rule.

The pyfunc carries the trained checkpoint and this package's code, and applies
the same decoding, resizing and normalisation as training, so
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)`` works in
any fresh Python process.
"""

from __future__ import annotations

import base64
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.config import RegisterConfig
from pipeline.images import ImageDecodeError, load_rgb
from pipeline.metrics import classification_metrics, is_better

log = logging.getLogger(__name__)
# MLflow suggests type hints on predict(); this model accepts several input forms on
# purpose (checked in decode_inputs), so the hint-based validation does not apply.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")

PACKAGE_DIR = Path(__file__).resolve().parent
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
    elif isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        items = list(model_input)
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

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        images, errors = decode_inputs(model_input)
        ok = [i for i, img in enumerate(images) if img is not None]
        probs = self.predictor.predict([images[i] for i in ok])
        return format_predictions(probs, ok, errors, self.predictor.meta.class_names)


def format_predictions(probs: np.ndarray, ok: list[int], errors: list[str | None],
                       class_names: tuple[str, ...]) -> pd.DataFrame:
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


def log_pyfunc(checkpoint: str | Path, example: np.ndarray) -> str:
    """Log the pyfunc model to the active run; return its model URI."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(example).save(buf, format="PNG")
    input_example = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})
    with warnings.catch_warnings():  # the input forms are checked in decode_inputs
        warnings.filterwarnings("ignore", message=".*type hints.*")
        warnings.filterwarnings("ignore", message=".*CloudPickle.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=CellClassifier(),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(PACKAGE_DIR)],
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
            "scikit-learn", "mlflow"]
    return [f"{p}=={version(p)}" for p in pkgs]


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    metric: str
    value: float
    champion_before: str | None
    champion_value: float | None
    promoted: bool

    def summary(self) -> str:
        """One sentence for the stage log: what happened and why."""
        if self.champion_before is None:
            return f"{self.name} v{self.version} is the first model: alias set ({self.metric}={self.value:.4f})"
        verdict = "beats" if self.promoted else "does not beat"
        what = "takes the alias" if self.promoted else "stays without the alias"
        return (f"{self.name} v{self.version} ({self.metric}={self.value:.4f}) {verdict} champion "
                f"v{self.champion_before} ({self.metric}={self.champion_value:.4f}) on the same test "
                f"split: it {what}")


def register(cfg: RegisterConfig, name: str, model_uri: str, test_metrics: dict[str, Any],
             prepared: str | Path, positive_class: str | None = None,
             experiment: str | None = None, params: dict[str, Any] | None = None) -> RegisterResult:
    """Register the run's model; move ``cfg.alias`` to it only if it beats the champion.

    The champion's figure is its tag when it was measured on the same test split
    as this model; otherwise the champion is re-scored on this test split, so the
    comparison is always like for like.
    """
    from pipeline.prepare import split_id

    set_tracking(experiment)
    sid = split_id(prepared, "test")
    return promote(cfg, name, model_uri, test_metrics, sid,
                   lambda uri: score_on_split(uri, prepared, "test", positive_class),
                   provenance(prepared, test_metrics, params))


def provenance(prepared: str | Path, test_metrics: dict[str, Any],
               params: dict[str, Any] | None) -> dict[str, str]:
    """Tags that say where a version came from: data hash, git commit, params, metrics."""
    import json
    import subprocess

    from pipeline.prepare import split_id

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+uncommitted" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    tags = {"dataset_id": "-".join(split_id(prepared, s) for s in ("train", "val", "test")),
            "git_commit": commit}
    if params:
        tags["params"] = json.dumps(params, sort_keys=True, default=str)[:5000]
    tags.update({f"test_{k}": f"{v:.6f}" for k, v in test_metrics.items() if isinstance(v, float)})
    return tags


def promote(cfg: RegisterConfig, name: str, model_uri: str, test_metrics: dict[str, Any],
            split_id: str, score_champion: Callable[[str], dict[str, Any]],
            tags: dict[str, str] | None = None) -> RegisterResult:
    """Register ``model_uri`` as a new version of ``name``; apply the champion rule."""
    client = mlflow.MlflowClient()
    if cfg.metric not in test_metrics or not isinstance(test_metrics[cfg.metric], float):
        raise ValueError(f"register.metric '{cfg.metric}' is not among the test metrics "
                         f"{sorted(k for k, v in test_metrics.items() if isinstance(v, float))}")
    value = float(test_metrics[cfg.metric])
    champion = _current(client, name, cfg.alias)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints.*")
        mv = mlflow.register_model(model_uri, name)
    tags = {**(tags or {}), "split_id": split_id, "run_id": mv.run_id or "",
            f"test_{cfg.metric}": f"{value:.6f}"}
    for key, val in tags.items():
        client.set_model_version_tag(mv.name, mv.version, key, val)
    champ_value = None
    if champion is not None:
        champ_value = _champion_value(champion, cfg, split_id, score_champion)
    promoted = champion is None or is_better(cfg.metric, value, champ_value, cfg.margin)
    if promoted:
        client.set_registered_model_alias(mv.name, cfg.alias, mv.version)
        if champion is not None:
            client.set_model_version_tag(mv.name, mv.version, f"previous_{cfg.alias}",
                                         str(champion.version))
    result = RegisterResult(mv.name, str(mv.version), cfg.metric, value,
                            None if champion is None else str(champion.version), champ_value, promoted)
    client.set_model_version_tag(mv.name, mv.version, "promotion", result.summary())
    log.info(result.summary())
    return result


def rollback(name: str, alias: str = "champion", to: str | None = None) -> tuple[str, str]:
    """Move ``alias`` back to the version it had before (or to version ``to``).

    Returns:
        (version it left, version it points to now)
    """
    client = mlflow.MlflowClient()
    current = _current(client, name, alias)
    if current is None:
        raise ValueError(f"registered model '{name}' has no alias '{alias}' to roll back")
    target = to or current.tags.get(f"previous_{alias}")
    if not target:
        raise ValueError(f"{name} v{current.version} has no previous {alias} recorded; "
                         f"name the version to roll back to")
    client.get_model_version(name, target)  # fails clearly if it does not exist
    client.set_registered_model_alias(name, alias, target)
    client.set_model_version_tag(name, str(current.version), "rolled_back",
                                 f"{alias} moved back to v{target}")
    log.info("%s: alias %s moved from v%s back to v%s", name, alias, current.version, target)
    return str(current.version), str(target)


def set_tracking(experiment: str | None = None) -> None:
    """Point MLflow at the pipeline's tracking URI (and experiment, if given)."""
    from pipeline.tracking import setup_mlflow, tracking_uri

    if experiment:
        setup_mlflow(experiment)
    else:
        mlflow.set_tracking_uri(tracking_uri())


def _current(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_value(champion, cfg: RegisterConfig, split_id: str, score_champion) -> float:
    tag = champion.tags.get(f"test_{cfg.metric}")
    if champion.tags.get("split_id") == split_id and tag is not None:
        return float(tag)
    log.info("champion v%s was measured on another split: re-scoring it", champion.version)
    return float(score_champion(f"models:/{champion.name}/{champion.version}")[cfg.metric])


def score_on_split(model_uri: str, prepared: str | Path, split: str,
                   positive_class: str | None) -> dict[str, Any]:
    """Metrics of a registered pyfunc on the original images of a prepared split."""
    manifest = pd.read_parquet(Path(prepared) / "manifest.parquet")
    class_names = sorted(manifest["label"].unique())
    rows = manifest[manifest["split"] == split]
    images = [(Path(prepared) / "images" / p).read_bytes() for p in rows["path"]]
    preds = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
    labels = rows["label"].map({c: i for i, c in enumerate(class_names)}).to_numpy()
    probs = preds[[f"prob_{c}" for c in class_names]].to_numpy()
    return classification_metrics(labels, probs, class_names,
                                  positive_class if positive_class in class_names else None)
