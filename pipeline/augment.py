"""Albumentations policies built from the ``augment:`` params."""

from __future__ import annotations

import albumentations as A
import numpy as np

from pipeline.config import AugmentConfig


def build_train_transform(cfg: AugmentConfig, seed: int | None = None) -> A.Compose:
    """Training-time augmentation of uint8 RGB cell images (no resizing, no normalising).

    Cell crops have no canonical orientation, so flips and any rotation are safe;
    brightness/contrast and hue/saturation cover stain and illumination variation.
    """
    transforms = [
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.RandomRotate90(p=cfg.rotate90),
        A.Rotate(limit=cfg.rotate_limit, border_mode=0, fill=0, p=cfg.rotate),
        A.RandomBrightnessContrast(brightness_limit=cfg.brightness_limit,
                                   contrast_limit=cfg.contrast_limit, p=cfg.brightness_contrast),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=0,
                             p=cfg.hue_saturation),
        A.GaussNoise(std_range=(0.02, 0.06), p=cfg.gauss_noise),
    ]
    # Albumentations 2 draws from its own generator: seed it, or runs do not repeat.
    return A.Compose([t for t in transforms if t.p > 0], seed=seed)


def apply(transform: A.Compose, images: np.ndarray) -> np.ndarray:
    """Apply ``transform`` to each image of an ``NxHxWx3`` batch."""
    return np.stack([transform(image=img)["image"] for img in images])


def tta_views(batch: "np.ndarray") -> list[np.ndarray]:
    """The eight dihedral views (rotations x flip) of an ``NxHxWxC`` batch."""
    views = []
    for flip in (False, True):
        b = batch[:, :, ::-1] if flip else batch
        views += [np.rot90(b, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for v in views]
