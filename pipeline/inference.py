"""Turning images into class probabilities: one code path for evaluation, the
registered MLflow model and batch scoring."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.augment import tta_views
from pipeline.images import resize
from pipeline.models import create_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a trained model and feed it correctly."""

    model: str
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def to_tensor(batch: np.ndarray | torch.Tensor, meta: ModelMeta, device: torch.device | str = "cpu",
              channels_last: bool = True) -> torch.Tensor:
    """uint8 ``NxHxWx3`` → normalised float ``NxCxHxW`` tensor on ``device``."""
    if not isinstance(batch, torch.Tensor):  # a writable copy: batches may be read-only mmaps
        batch = torch.from_numpy(np.array(batch, dtype=np.uint8))
    x = batch.to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1) * 255.0
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def save_checkpoint(path: str | Path, model: nn.Module, meta: ModelMeta, **extra) -> None:
    """Save weights and metadata in one file (``torch.load(weights_only=True)``-safe)."""
    state = {"model": model.state_dict(), "meta": asdict(meta), **extra}
    torch.save(state, path)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model saved by :func:`save_checkpoint`, in eval mode."""
    state = torch.load(path, map_location=device, weights_only=True)
    m = state["meta"]
    meta = ModelMeta(m["model"], tuple(m["class_names"]), int(m["image_size"]),
                     tuple(m["mean"]), tuple(m["std"]))
    model = create_model(meta.model, len(meta.class_names), pretrained=False)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, meta


class Predictor:
    """Batched, optionally test-time-augmented class probabilities from a model."""

    def __init__(self, model: nn.Module, meta: ModelMeta, batch_size: int = 128,
                 tta: bool = False, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.meta, self.batch_size, self.tta = meta, batch_size, tta

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Predictor":
        model, meta = load_checkpoint(path)
        return cls(model, meta, **kwargs)

    @torch.inference_mode()
    def predict_resized(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Probabilities ``NxK`` for images already at ``meta.image_size``
        (``tta`` None: the predictor's own setting)."""
        tta = self.tta if tta is None else tta
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.asarray(images[start:start + self.batch_size])
            views = tta_views(batch) if tta else [batch]
            probs = sum(torch.softmax(self.model(to_tensor(v, self.meta, self.device)), 1)
                        for v in views) / len(views)
            out.append(probs.float().cpu().numpy())
        k = len(self.meta.class_names)
        return np.concatenate(out) if out else np.zeros((0, k), np.float32)

    def predict(self, images: Sequence[np.ndarray], tta: bool | None = None) -> np.ndarray:
        """Probabilities ``NxK`` for RGB images of any size (resized like training)."""
        if not len(images):
            return np.zeros((0, len(self.meta.class_names)), np.float32)
        size = self.meta.image_size
        return self.predict_resized(np.stack([resize(img, size) for img in images]), tta)
