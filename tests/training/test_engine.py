"""engine: the loaders every Ray Train worker builds (seeded augmentation per loader process)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.data.augment import load_policy, policy
from pipeline.training.engine import ArrayDataset, loader_workers, make_loader


def _augmenting(n: int = 8) -> ArrayDataset:
    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    return ArrayDataset(np.stack([image] * n), np.zeros(n, np.int64),
                        load_policy(policy(AugmentConfig(), 48), seed=0))


def test_loader_processes_draw_their_own_augmentations_after_the_parent_augmented():
    """The same image through two loader processes: each draws its own augmentations (a forked
    copy of one seeded transform would repeat the same ones), and the loader does not hang
    after the parent process has used OpenCV (it did with ``cv2.setNumThreads`` in the child)."""
    data = _augmenting()
    parent = [data[i][0] for i in range(8)]  # the parent augments first (OpenCV's pool is up)
    assert len({a.tobytes() for a in parent}) > 1
    loader = make_loader(data, 1, torch.device("cpu"), workers=2,
                         generator=torch.Generator().manual_seed(0))
    batches = [images[0].numpy() for images, _ in loader]  # batch i comes from process i % 2
    assert len(batches) == 8
    # unseeded, both processes would draw the same sequence for the same image
    assert [a.tobytes() for a in batches[0::2]] != [b.tobytes() for b in batches[1::2]]
    again = [images[0].numpy() for images, _ in make_loader(
        data, 1, torch.device("cpu"), workers=2, generator=torch.Generator().manual_seed(0))]
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded: the same run twice


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 1), (4, 3), (5, 4), (64, 4), (None, 0)])
def test_loader_workers_auto_is_none_on_cpu_and_some_on_a_gpu(monkeypatch, cores, workers):
    """Auto on a GPU: one core left to the step, at most 4 loader processes (an unknown core
    count counts as one); on CPU none, whatever the cores. The expected counts are by hand."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert loader_workers(-1, torch.device("cuda")) == workers
    assert loader_workers(-1, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3 and loader_workers(3, torch.device("cuda")) == 3
    assert loader_workers(0, torch.device("cuda")) == 0  # asked for none: none, even on a GPU


def test_loader_pins_memory_only_for_a_gpu():
    data = _augmenting(2)
    assert make_loader(data, 1, torch.device("cuda")).pin_memory
    assert not make_loader(data, 1, torch.device("cpu")).pin_memory
