"""augment: each configured transform really changes the image (old arg names are ignored
silently by Albumentations 2, so this catches a transform that does nothing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.augment import apply, build_train_transform, tta_views
from pipeline.config import AugmentConfig
from pipeline.synthetic import synthetic_cell

OFF = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name in
       ("hflip", "vflip", "rotate90", "rotate", "brightness_contrast", "hue_saturation", "gauss_noise")}


@pytest.mark.parametrize("knob", sorted(OFF))
def test_each_transform_changes_the_image(knob):
    img = synthetic_cell(np.random.default_rng(0), True, 64)
    img[:8, :8] = 255  # break the symmetry so flips are visible
    cfg = AugmentConfig(**{**OFF, knob: 1.0})
    transform = build_train_transform(cfg)
    assert len(transform.transforms) == 1
    changed = [not np.array_equal(transform(image=img)["image"], img) for _ in range(5)]
    assert any(changed)


def test_all_off_is_identity_and_shapes_kept():
    img = synthetic_cell(np.random.default_rng(1), False, 48)
    assert np.array_equal(build_train_transform(AugmentConfig(**OFF))(image=img)["image"], img)
    out = apply(build_train_transform(AugmentConfig()), np.stack([img, img]))
    assert out.shape == (2, 48, 48, 3) and out.dtype == np.uint8


def test_tta_views_are_the_eight_dihedral_images():
    batch = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    views = tta_views(batch)
    assert len(views) == 8 and np.array_equal(views[0], batch)
    assert len({v.tobytes() for v in views}) == 8
