"""worker: what a checkpoint holds and what a restarted worker restores from it."""

from __future__ import annotations

import pytest
import torch
from ray.train import Checkpoint

from pipeline.config import TrainConfig
from pipeline.serving.inference import ModelMeta, read_checkpoint
from pipeline.training.engine import EpochContext, weight_average
from pipeline.training.optim import EarlyStopping, build_optimizer, build_scheduler
from pipeline.training.worker import MODEL_FILE, TrainingState, resume, write_checkpoint

META = ModelMeta("baseline_cnn", ("a", "b"), 8, (0.5,) * 3, (0.5,) * 3)


def _state(seed: int, ema_decay: float) -> tuple[EpochContext, TrainingState]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    cfg = TrainConfig(ema_decay=ema_decay)
    optimizer = build_optimizer(cfg, [{"params": list(net.parameters()), "lr": cfg.lr}])
    state = TrainingState(optimizer, build_scheduler(cfg, optimizer), EarlyStopping(0),
                          weight_average(net, ema_decay))
    return EpochContext(net, torch.nn.CrossEntropyLoss(), META, torch.device("cpu"), False, None, 0), state


def _step(ctx: EpochContext, state: TrainingState, batch: int) -> None:
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(batch)), torch.arange(8) % 2
    state.optimizer.zero_grad()
    ctx.loss_fn(ctx.model(x), y).backward()
    state.optimizer.step()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(ctx.model)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_restarted_worker_goes_on_from_the_weights_and_their_average(tmp_path, ema_decay):
    ctx, state = _state(0, ema_decay)
    for batch in range(5):
        _step(ctx, state, batch)
    write_checkpoint(tmp_path, ctx, state, epoch=2)
    kept = read_checkpoint(tmp_path / MODEL_FILE)["model"]
    served = ctx.model if state.ema is None else state.ema.module  # the file holds what is kept
    assert all(torch.equal(kept[k], v) for k, v in served.state_dict().items())

    fresh_ctx, fresh = _state(1, ema_decay)  # another start, as a restarted worker has
    assert resume(Checkpoint.from_directory(str(tmp_path)), fresh_ctx.model, fresh) == 2
    for k, v in ctx.model.state_dict().items():  # training goes on from the weights themselves
        assert torch.equal(fresh_ctx.model.state_dict()[k], v), k
    assert fresh.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
    if ema_decay:
        assert int(fresh.ema.n_averaged) == 5
        assert all(torch.equal(fresh.ema.module.state_dict()[k], v) for k, v in kept.items())
    _step(ctx, state, 5)  # and both take the same next step
    _step(fresh_ctx, fresh, 5)
    assert all(torch.equal(fresh_ctx.model.state_dict()[k], v)
               for k, v in ctx.model.state_dict().items())
