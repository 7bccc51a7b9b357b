"""Grad-CAM: where the model looked, for a grid of its worst test errors."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.serving.inference import ModelMeta, to_tensor


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The model's last 2-D convolution, whose activations Grad-CAM weights."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(model: nn.Module, meta: ModelMeta, images: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Heat maps ``NxHxW`` in 0..1 for class ``target[i]`` of each uint8 image."""
    layer = last_conv(model)
    store: dict[str, torch.Tensor] = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("grad", go[0]))
    try:
        model.eval()
        x = to_tensor(images, meta, next(model.parameters()).device, channels_last=False)
        x.requires_grad_(True)
        logits = model(x)
        model.zero_grad(set_to_none=True)
        logits.gather(1, torch.as_tensor(target, device=x.device).view(-1, 1)).sum().backward()
    finally:
        h1.remove()
        h2.remove()
    weights = store["grad"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * store["act"]).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)
    cam = cam[:, 0].detach().cpu().numpy()
    cam -= cam.min(axis=(1, 2), keepdims=True)
    return cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-8)


def worst_errors(labels: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` most confident wrong predictions."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    return wrong[np.argsort(-probs[wrong, pred[wrong]])][:n]
