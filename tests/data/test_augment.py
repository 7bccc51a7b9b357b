"""augment: every transform of the strong preset really changes the image (Albumentations 2
ignores old argument names silently), presets, the saved policy round trip, preview, TTA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import AugmentConfig
from pipeline.data.augment import (
    PRESETS,
    build_train_transform,
    load_policy,
    policy,
    resolve_preset,
    save_policy,
    tta_views,
)
from pipeline.data.synthetic import synthetic_cell
from pipeline.training.engine import ArrayDataset

FAMILIES = sorted(PRESETS["strong"])


def _image() -> np.ndarray:
    img = synthetic_cell(np.random.default_rng(0), True, 64)
    img[:8, :8] = 255  # break the symmetry so flips are visible
    return img


@pytest.mark.parametrize("family", FAMILIES)
def test_each_strong_transform_changes_the_image_and_not_the_label(family):
    cfg = AugmentConfig(preset="custom", **{**PRESETS["none"], family: 1.0})
    transform = build_train_transform(cfg, image_size=64, seed=0)
    assert len(transform.transforms) == 1
    img = _image()
    outs = [transform(image=img)["image"] for _ in range(5)]
    assert any(not np.array_equal(o, img) for o in outs), family
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    data = ArrayDataset(np.stack([img] * 3), np.array([2, 0, 1]), transform)
    assert [data[i][1] for i in range(3)] == [2, 0, 1]


def test_presets():
    assert build_train_transform(AugmentConfig(preset="none")).transforms == []
    assert len(build_train_transform(AugmentConfig(preset="strong")).transforms) == len(FAMILIES)
    assert resolve_preset(AugmentConfig(preset="light")).stain == 0.0
    with pytest.raises(ValueError, match="augment.preset"):
        resolve_preset(AugmentConfig(preset="medium"))


def test_none_is_identity_and_batches_keep_shape():
    img = _image()
    assert np.array_equal(build_train_transform(AugmentConfig(preset="none"))(image=img)["image"], img)
    transform = build_train_transform(AugmentConfig())
    out = np.stack([transform(image=i)["image"] for i in (img, img)])
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8


def test_saved_policy_loads_back_identically_and_seeded(tmp_path):
    import yaml

    cfg = AugmentConfig(preset="strong")
    path = save_policy(cfg, 64, tmp_path / "augment.yaml")
    saved = yaml.safe_load(path.read_text())
    def summary(d):
        return [(t["__class_fullname__"], t["p"]) for t in d["transform"]["transforms"]]

    assert summary(saved) == summary(policy(cfg, 64)) and len(summary(saved)) == len(FAMILIES)
    a, b = load_policy(saved, seed=7), load_policy(saved, seed=7)
    img = _image()
    assert np.array_equal(a(image=img)["image"], b(image=img)["image"])


def test_preview_grid(tmp_path):
    from pipeline.plots import augmentation_preview

    out = augmentation_preview(build_train_transform(AugmentConfig()), np.stack([_image()] * 2),
                               tmp_path / "p.png")
    assert out.stat().st_size > 1000


def test_tta_views_are_the_eight_dihedral_images():
    batch = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    views = tta_views(batch)
    assert len(views) == 8 and np.array_equal(views[0], batch)
    assert len({v.tobytes() for v in views}) == 8


def test_params_presets_cover_every_family():
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    assert set(FAMILIES) <= fields
