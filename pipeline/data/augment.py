"""Albumentations policies from the ``augment:`` params: build, save, load; TTA views.

The ``augment`` stage writes the policy in Albumentations' own serialisation
format (``A.save``); ``train`` loads exactly that file, and it is logged to
MLflow, so the policy a model was trained with is versioned with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from pipeline.config import AugmentConfig

# Probabilities of each family per preset; "custom" uses the params as written.
_OFF = {"hflip": 0.0, "vflip": 0.0, "rotate90": 0.0, "rotate": 0.0, "affine": 0.0,
        "resized_crop": 0.0, "hue_saturation": 0.0, "brightness_contrast": 0.0, "gamma": 0.0,
        "gauss_noise": 0.0, "blur": 0.0, "stain": 0.0}
PRESETS: dict[str, dict[str, float]] = {
    "none": _OFF,
    "light": {**_OFF, "hflip": 0.5, "vflip": 0.5, "rotate90": 0.5, "brightness_contrast": 0.3},
    "strong": {"hflip": 0.5, "vflip": 0.5, "rotate90": 0.5, "rotate": 0.5, "affine": 0.5,
               "resized_crop": 0.3, "hue_saturation": 0.5, "brightness_contrast": 0.5,
               "gamma": 0.3, "gauss_noise": 0.3, "blur": 0.2, "stain": 0.5},
}


def resolve_preset(cfg: AugmentConfig) -> AugmentConfig:
    """``cfg`` with the probabilities of its preset filled in (``custom`` keeps them)."""
    if cfg.preset == "custom":
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown augment.preset '{cfg.preset}'; choose custom or one of {sorted(PRESETS)}")
    return dataclasses.replace(cfg, **PRESETS[cfg.preset])


def build_train_transform(cfg: AugmentConfig, image_size: int = 96, seed: int | None = None) -> A.Compose:
    """Training-time augmentation of uint8 RGB images (no resizing, no normalising).

    Cell and tissue crops have no canonical orientation, so flips and any rotation
    are safe; colour, gamma and stain jitter cover staining and illumination.
    """
    c = resolve_preset(cfg)
    transforms = [
        A.HorizontalFlip(p=c.hflip),
        A.VerticalFlip(p=c.vflip),
        A.RandomRotate90(p=c.rotate90),
        A.Rotate(limit=c.rotate_limit, border_mode=0, fill=0, p=c.rotate),
        A.Affine(scale=(1 - c.scale_limit, 1 + c.scale_limit),
                 translate_percent=(-c.shift_limit, c.shift_limit), border_mode=0, fill=0, p=c.affine),
        A.RandomResizedCrop(size=(image_size, image_size), scale=(c.crop_scale_min, 1.0), p=c.resized_crop),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=0, p=c.hue_saturation),
        A.RandomBrightnessContrast(brightness_limit=c.brightness_limit, contrast_limit=c.contrast_limit,
                                   p=c.brightness_contrast),
        A.RandomGamma(gamma_limit=(80, 120), p=c.gamma),
        A.GaussNoise(std_range=(0.02, 0.06), p=c.gauss_noise),
        A.Blur(blur_limit=(3, 5), p=c.blur),
        A.HEStain(method="random_preset", p=c.stain),
    ]
    # Albumentations 2 draws from its own generator: seed it, or runs do not repeat.
    return A.Compose([t for t in transforms if t.p > 0], seed=seed)


def policy(cfg: AugmentConfig, image_size: int) -> dict[str, Any]:
    """The policy in Albumentations' serialisation format (what ``A.save`` writes)."""
    return A.to_dict(build_train_transform(cfg, image_size))


def save_policy(cfg: AugmentConfig, image_size: int, path: str | Path) -> Path:
    """Write the policy file ``train`` loads (YAML, Albumentations' own format)."""
    from pipeline.files import atomic_path

    with atomic_path(path) as tmp:
        A.save(build_train_transform(cfg, image_size), str(tmp), data_format="yaml")
    return Path(path)


def load_policy(policy_dict: dict[str, Any], seed: int | None = None) -> A.Compose:
    """Rebuild a saved policy, seeded for this worker."""
    transform = A.from_dict(policy_dict)
    transform.set_random_seed(seed)
    return transform


def tta_views(batch: np.ndarray) -> list[np.ndarray]:
    """The eight dihedral views (rotations x flip) of an ``NxHxWxC`` batch."""
    views = []
    for flip in (False, True):
        b = batch[:, :, ::-1] if flip else batch
        views += [np.rot90(b, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for v in views]
