"""Stain matching: each cell's colours moved to the training cells' colour statistics.

Patients differ mostly in staining (pink against purple smears). With ``train.stain_norm``
every image the model sees, in training, evaluation and serving alike (through
:func:`pipeline.serving.inference.to_tensor`), has each channel's mean and standard deviation
over the cell (not the black background around it) set to a reference: the mean of the
training cells' own statistics, recorded in the checkpoint. It is the per-channel RGB form
of Reinhard et al.'s colour transfer (IEEE CG&A, 2001).
"""

from __future__ import annotations

import numpy as np
import torch

# A pixel whose channels sum to no more than this (of 765) is the crop's black background.
BACKGROUND = 24.0
# Channels flatter than this (of 255) keep their spread: a uniform image is not stretched.
MIN_SD = 1.0


def cell_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation over the cell's pixels of float
    ``NxCxHxW`` images in 0-255, and the cell mask ``Nx1xHxW``."""
    mask = (x.sum(1, keepdim=True) > BACKGROUND).to(x.dtype)
    n = mask.sum((2, 3), keepdim=True).clamp(min=1.0)
    mean = (x * mask).sum((2, 3), keepdim=True) / n
    var = ((x - mean) ** 2 * mask).sum((2, 3), keepdim=True) / n
    return mean, var.sqrt().clamp(min=MIN_SD), mask


def match_stain(x: torch.Tensor, reference: tuple[float, ...]) -> torch.Tensor:
    """Images ``NxCxHxW`` (0-255) with each cell's channel statistics moved to ``reference``
    (three means, then three standard deviations); the background is left as it is."""
    mean, sd, mask = cell_stats(x)
    ref = torch.tensor(reference, dtype=x.dtype, device=x.device).view(2, 1, 3, 1, 1)
    matched = ((x - mean) / sd * ref[1] + ref[0]).clamp(0.0, 255.0)
    return torch.where(mask.bool(), matched, x)


def stain_reference(images: np.ndarray, limit: int = 4096) -> tuple[float, ...]:
    """The reference of ``match_stain``: the mean per-channel statistics of up to ``limit``
    cells of ``images`` (``NxHxWx3`` uint8), evenly spaced so the choice is deterministic."""
    if len(images) == 0:
        raise ValueError("no training images to take a stain reference from")
    pick = np.unique(np.linspace(0, len(images) - 1, min(limit, len(images))).round().astype(int))
    stats = []
    for start in range(0, len(pick), 256):  # a few MB at a time, whatever the image size
        x = torch.from_numpy(np.asarray(images[pick[start:start + 256]])).permute(0, 3, 1, 2).float()
        mean, sd, _ = cell_stats(x)
        stats.append(torch.cat([mean, sd], 1).flatten(1))
    return tuple(round(float(v), 3) for v in torch.cat(stats).mean(0))
