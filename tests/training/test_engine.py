"""engine: the loaders every Ray Train worker builds (seeded augmentation per loader process) and
the moving average of the weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.data.augment import load_policy, policy
from pipeline.serving.inference import ModelMeta
from pipeline.training.engine import (
    ArrayDataset,
    EpochContext,
    loader_workers,
    make_loader,
    train_one_epoch,
    weight_average,
)


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


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_the_weight_average_is_off_at_zero_and_warms_up_to_its_decay():
    assert weight_average(_net(), 0.0) is None
    net = _net()
    ema = weight_average(net, 0.9)
    start = net[0].weight.detach().clone()
    ema.update_parameters(net)  # the first update copies
    for n in range(1, 40):
        with torch.no_grad():
            net[0].weight.add_(1.0)
            net[1].running_mean.add_(1.0)
        before = ema.module[0].weight.detach().clone()
        ema.update_parameters(net)
        d = min(0.9, (1 + n) / (10 + n))  # 2/11 after one update; the full 0.9 after 80
        torch.testing.assert_close(ema.module[0].weight, before * d + net[0].weight * (1 - d))
    assert 0 < (net[0].weight - ema.module[0].weight).mean() < 39  # it lags the weights
    assert torch.equal(net[0].weight - start, torch.full_like(start, 39.0))
    assert ema.module[1].running_mean.mean() > 0  # batch-norm statistics are averaged too
    assert ema.module[1].num_batches_tracked.dtype == torch.int64


def test_a_training_pass_updates_the_average_after_every_step():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 2))
    ema = weight_average(net, 0.5)
    meta = ModelMeta("baseline_cnn", ("a", "b"), 8, (0.5,) * 3, (0.5,) * 3)
    ctx = EpochContext(net, torch.nn.CrossEntropyLoss(), meta, torch.device("cpu"), False, None, 0)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8), np.arange(12) % 2)
    train_one_epoch(ctx, make_loader(data, 4, torch.device("cpu")), torch.optim.SGD(net.parameters(), lr=0.1),
                    0, ema)
    assert int(ema.n_averaged) == 3  # three batches, three steps
    assert not torch.equal(ema.module[1].weight, net[1].weight)  # an average, not the last weights
