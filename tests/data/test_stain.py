"""Stain matching: a cell's colour statistics moved to the reference, the background kept,
and the same in training and serving (through the checkpoint's metadata)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.stain import cell_stats, match_stain, stain_reference
from pipeline.serving.inference import ModelMeta, model_from, save_checkpoint, to_tensor


def _cell(rgb: tuple[float, float, float], spread: float, size: int = 32, seed: int = 0) -> np.ndarray:
    """A round cell of colour ``rgb`` with texture of ``spread`` on a black background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    texture = rng.normal(0, 1, (size, size, 1))
    img = np.clip(np.array(rgb) + spread * texture, 30, 255) * inside[..., None]
    return img.astype(np.uint8)


def _tensor(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


REFERENCE = (180.0, 120.0, 150.0, 20.0, 15.0, 10.0)


def test_a_cell_takes_the_references_statistics_and_the_background_stays_black():
    pink, purple = _cell((220, 140, 170), 8, seed=1), _cell((120, 80, 160), 25, seed=2)
    out = match_stain(_tensor(pink, purple), REFERENCE)
    mean, sd, mask = cell_stats(out)
    assert mean.flatten(1).numpy() == pytest.approx(np.array([REFERENCE[:3]] * 2), abs=1.0)
    assert sd.flatten(1).numpy() == pytest.approx(np.array([REFERENCE[3:]] * 2), abs=1.0)
    background = ~mask.bool().expand_as(out)
    assert background.sum() > 0 and float(out[background].abs().max()) == 0.0


def test_two_stainings_of_one_cell_reach_the_model_alike_only_when_matching_is_on():
    cell = _cell((200, 120, 160), 15, seed=3).astype(float)
    restained = np.where(cell > 0, cell * np.array([0.6, 0.7, 1.2]) + 20, 0).clip(0, 255).astype(np.uint8)
    batch = np.stack([cell.astype(np.uint8), restained])
    plain = ModelMeta("baseline_cnn", ("a", "b"), 32, (0.5,) * 3, (0.5,) * 3)
    matched = ModelMeta(**{**plain.__dict__, "stain": REFERENCE})
    x = to_tensor(batch, plain, channels_last=False)
    y = to_tensor(batch, matched, channels_last=False)
    assert float((x[0] - x[1]).abs().mean()) > 0.05  # 0.12: the stainings differ
    assert float((y[0] - y[1]).abs().mean()) < 0.005  # 0.001: matched, they do not


def test_the_reference_is_the_mean_of_the_cells_statistics_and_the_checkpoint_keeps_it(tmp_path):
    images = np.stack([_cell((200, 100, 150), 10, seed=s) for s in range(5)]
                      + [_cell((100, 60, 130), 30, seed=s) for s in range(5)])
    ref = stain_reference(images)
    mean, sd, _ = cell_stats(_tensor(*images))
    assert ref == pytest.approx([*mean.mean(0).flatten().tolist(), *sd.mean(0).flatten().tolist()], abs=1e-3)
    assert stain_reference(images, limit=3) == stain_reference(images[[0, 4, 9]])  # evenly spaced, first and last
    with pytest.raises(ValueError, match="no training images"):
        stain_reference(images[:0])

    from pipeline.models import create_model

    meta = ModelMeta("baseline_cnn", ("a", "b"), 32, (0.5,) * 3, (0.5,) * 3, ref)
    save_checkpoint(tmp_path / "m.pt", create_model("baseline_cnn", 2, pretrained=False), meta)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert model_from(state)[1] == meta
    del state["meta"]["stain"]  # a checkpoint written before stain matching existed
    assert model_from(state)[1].stain == ()


def test_training_records_the_reference_of_its_own_training_cells_only_when_asked(prepared_synthetic):
    from pipeline.config import TrainConfig
    from pipeline.data.prepared import PreparedData
    from pipeline.training.driver import _meta

    data = PreparedData(prepared_synthetic)
    on = _meta(TrainConfig(model="baseline_cnn", stain_norm=True), data)
    assert on.stain == stain_reference(data.split("train").images) and len(on.stain) == 6
    assert on.stain != stain_reference(data.split("val").images)
    assert _meta(TrainConfig(model="baseline_cnn"), data).stain == ()
