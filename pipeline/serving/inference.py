"""Turning images into class probabilities: one code path for evaluation, the
registered MLflow model and batch scoring."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.data.augment import tta_views
from pipeline.data.images import resize
from pipeline.data.stain import match_stain
from pipeline.models import create_model, head_of
from pipeline.serving.screening import (
    InputLimits,
    Mahalanobis,
    RejectOption,
    appearance,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a trained model and feed it correctly."""

    model: str
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stain: tuple[float, ...] = ()  # train.stain_norm's reference (pipeline.data.stain); () = off


def to_tensor(batch: np.ndarray | torch.Tensor, meta: ModelMeta, device: torch.device | str = "cpu",
              channels_last: bool = True) -> torch.Tensor:
    """uint8 ``NxHxWx3`` → normalised float ``NxCxHxW`` tensor on ``device``."""
    if not isinstance(batch, torch.Tensor):  # a writable copy: batches may be read-only mmaps
        batch = torch.from_numpy(np.array(batch, dtype=np.uint8))
    x = batch.to(device).permute(0, 3, 1, 2).float()
    if meta.stain:
        x = match_stain(x, meta.stain)
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def save_checkpoint(path: str | Path, model: nn.Module, meta: ModelMeta, **extra) -> None:
    """Save weights and metadata in one file (``torch.load(weights_only=True)``-safe)."""
    state = {"model": model.state_dict(), "meta": asdict(meta), **extra}
    torch.save(state, path)


def read_checkpoint(path, device: str = "cpu") -> dict[str, Any]:
    """The checkpoint's contents (a path or an open binary file), read once."""
    return torch.load(path, map_location=device, weights_only=True)


def input_limits(state: dict[str, Any]) -> InputLimits | None:
    """The training cells' size range a checkpoint records (None: one written before it did)."""
    return InputLimits(**state["input_limits"]) if "input_limits" in state else None


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model saved by :func:`save_checkpoint`, in eval mode."""
    return model_from(read_checkpoint(path, device), device)


def model_from(state: dict[str, Any], device: str = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The model and its metadata from a checkpoint's contents, in eval mode."""
    m = state["meta"]
    meta = ModelMeta(m["model"], tuple(m["class_names"]), int(m["image_size"]),
                     tuple(m["mean"]), tuple(m["std"]), tuple(m.get("stain", ())))
    model = create_model(meta.model, len(meta.class_names), pretrained=False)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, meta


# Images per forward pass. On 2 cores (96 px), 64 ran at 1.3x the images/s of 256 and 1.2x
# those of 128, with the same features (the larger batches fall out of the CPU's caches).
BATCH_SIZE = 64


class Predictor:
    """Batched, optionally test-time-augmented class probabilities from a model, with the
    model's reject option (input limits and out-of-distribution score) when it has one."""

    def __init__(self, model: nn.Module, meta: ModelMeta, batch_size: int = BATCH_SIZE,
                 tta: bool = False, device: str | None = None, ood: RejectOption | None = None,
                 limits: InputLimits | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.meta, self.batch_size, self.tta = meta, batch_size, tta
        self.ood, self.limits = ood, limits
        self._features: torch.Tensor | None = None
        # The head's input is the penultimate feature vector, whatever the backbone.
        head_of(self.model).register_forward_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._features = args[0].detach()

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> "Predictor":
        state = read_checkpoint(path)
        model, meta = model_from(state)
        ood = RejectOption.from_state(state["ood"]) if "ood" in state else None
        return cls(model, meta, ood=ood, limits=input_limits(state), **kwargs)

    @torch.inference_mode()
    def assess_resized(self, images: np.ndarray, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``NxK`` and penultimate features ``NxD`` for images already at
        ``meta.image_size`` (``tta`` None: the predictor's own setting; the features are
        those of the image as given)."""
        tta = self.tta if tta is None else tta
        probs, feats = [], []
        for start in range(0, len(images), self.batch_size):
            batch = np.asarray(images[start:start + self.batch_size])
            views = tta_views(batch) if tta else [batch]
            total = 0
            for i, view in enumerate(views):
                total = total + torch.softmax(self.model(to_tensor(view, self.meta, self.device)), 1)
                if i == 0:
                    feats.append(self._features.flatten(1).float().cpu().numpy())
            probs.append((total / len(views)).float().cpu().numpy())
        k = len(self.meta.class_names)
        if not probs:
            return np.zeros((0, k), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs), np.concatenate(feats)

    def predict_resized(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Probabilities ``NxK`` for images already at ``meta.image_size``."""
        return self.assess_resized(images, tta)[0]

    def ood_scores(self, features: np.ndarray, pixels: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
        """The out-of-distribution score of each image (above 1: rejected; NaN: a model
        without a reject option), from its features and its resized pixels."""
        if self.ood is None or not len(features):
            return np.full(len(features), np.nan)
        return self.ood.score(features, pixels, stats)

    def predict(self, images: Sequence[np.ndarray], tta: bool | None = None) -> np.ndarray:
        """Probabilities ``NxK`` for RGB images of any size (resized like training)."""
        if not len(images):
            return np.zeros((0, len(self.meta.class_names)), np.float32)
        size = self.meta.image_size
        return self.predict_resized(np.stack([resize(img, size) for img in images]), tta)


FIT_CELLS = 4000  # training cells the OOD score is fitted on at most (a seeded draw)


def attach_reject_option(path: str | Path, train_images: np.ndarray, train_labels: np.ndarray,
                         val_images: np.ndarray, limits: InputLimits, seed: int = 0) -> RejectOption:
    """Fit the out-of-distribution score on training cells, set its thresholds on validation
    cells (:meth:`Mahalanobis.fit`), and store it with the input limits in the checkpoint."""
    state = read_checkpoint(path)
    predictor = Predictor(*model_from(state))
    pick = np.sort(np.random.default_rng(seed).permutation(len(train_images))[:FIT_CELLS])
    train_px, labels, val_px = np.asarray(train_images)[pick], np.asarray(train_labels)[pick], np.asarray(val_images)
    _, feats = predictor.assess_resized(train_px, tta=False)
    _, val_feats = predictor.assess_resized(val_px, tta=False)
    ood = RejectOption(Mahalanobis.fit(feats, labels, val_feats),
                       Mahalanobis.fit(appearance(train_px), labels, appearance(val_px)))
    state.update(ood=ood.state(), input_limits=asdict(limits))
    torch.save(state, path)
    return ood
