"""Cross-validation folds and sweep configurations as Ray Tune trials.

Each trial is one (configuration, fold): a Tune function trial that writes the fold's
prepared folder, trains it with the normal :func:`pipeline.training.driver.train` (its own
``TorchTrainer``, Ray Train V2's Tune integration: the trial is the trainer's driver and
holds no CPU itself) and predicts the held-out patients. Tune runs as many side by side
as the cluster's CPUs allow (here one after another). Each trial's training run is an
MLflow child of one parent run; a trial that fails is reported, and the others go on.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from pipeline.console import quiet_trial
from pipeline.params import Params
from pipeline.tracking import use_tracking_uri

log = logging.getLogger(__name__)

OOF_FILE = "oof.parquet"


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a named configuration of the params, and which fold it trains."""

    config: str
    fold: int
    params: Params
    prepared: str  # absolute path of the prepared folder at this configuration's image size
    folds: int
    fold_seed: int
    tta_variants: tuple[bool, ...] = (False,)  # predict the held-out fold with/without TTA
    exclude: frozenset[str] = frozenset()  # cells left out of training (manifest paths)


@dataclass(frozen=True)
class TrialOutcome:
    """What came back from one trial: its OOF rows, or why it failed."""

    spec: TrialSpec
    oof: pd.DataFrame | None
    wall_s: float
    run_id: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.oof is not None


def _trial(config: dict) -> None:
    """The Tune trial: write the fold, train it, predict its held-out patients."""
    import numpy as np
    import torch
    from ray import tune

    from pipeline.data.augment import policy
    from pipeline.data.prepared import PreparedData
    from pipeline.evaluation.evaluate import predict_split
    from pipeline.selection.crossval import make_folds, write_fold
    from pipeline.training.driver import RunOptions, train

    spec: TrialSpec = config["trial"]
    quiet_trial()
    use_tracking_uri(config["tracking_uri"])
    p, t0 = spec.params, time.perf_counter()
    data = PreparedData(spec.prepared)
    fold = make_folds(data, spec.folds, spec.fold_seed, p.prepare.val_ratio, p.evaluate.positive_class,
                      spec.exclude)[spec.fold]
    with tempfile.TemporaryDirectory(prefix="fold-") as d:
        fold_data = write_fold(data, fold, Path(d) / "prepared")
        result = train(p.train, policy(p.augment, data.image_size), fold_data.root, Path(d) / "model",
                       p.dataset, RunOptions(
                           parent_run_id=config["parent_run_id"],
                           run_name=f"{config['parent_name']}/{spec.config}/fold{spec.fold}",
                           extra_params={"crossval.config": spec.config, "crossval.fold": spec.fold,
                                         "crossval.folds": spec.folds, "crossval.seed": spec.fold_seed,
                                         "augment.preset": p.augment.preset,
                                         "prepare.image_size": data.image_size},
                           register_model=False))
        held = fold_data.rows("test")
        workers = (os.cpu_count() or 1) if p.train.num_workers == "auto" else p.train.num_workers
        torch.set_num_threads(max(1, int(workers * p.train.cpus_per_worker)))  # the trainer is done
        frames = []
        for tta in spec.tta_variants:
            labels, probs, classes, _ = predict_split(result.model_path, fold_data.root, "test",
                                                      p.evaluate.batch_size, tta)
            pos = classes.index(p.evaluate.positive_class) if p.evaluate.positive_class in classes else 1
            frames.append(pd.DataFrame({
                "path": held["path"].to_numpy(), "patient_id": held["patient_id"].to_numpy(),
                "label": held["label"].to_numpy(), "fold": spec.fold,
                "p_pos": probs[:, pos].astype(np.float64), "tta": tta,
                "best_epoch": result.best_epoch}))
        out = Path(d) / "result"
        out.mkdir()
        pd.concat(frames, ignore_index=True).to_parquet(out / OOF_FILE, index=False)
        tune.report({"wall_s": time.perf_counter() - t0, "run_id": result.run_id},
                    checkpoint=tune.Checkpoint.from_directory(str(out)))


def run_trials(specs: list[TrialSpec], name: str, storage: str | Path, parent_run_id: str,
               cpus_per_trial: float, tracking_uri: str) -> list[TrialOutcome]:
    """Run every trial with Ray Tune; outcomes in the order of ``specs``."""
    from pipeline.cluster import init_ray

    init_ray()  # before Ray is imported: it reads its settings then
    import ray
    from ray import tune

    side_by_side = max(1, math.floor(ray.cluster_resources().get("CPU", 1) / cpus_per_trial))
    tuner = tune.Tuner(
        # The trial only drives a TorchTrainer, whose workers hold the CPUs: it asks for none
        # (Tune needs a non-empty request, so a token of memory).
        tune.with_resources(_trial, {"CPU": 0, "memory": 1 << 20}),
        param_space={"trial": tune.grid_search(specs), "tracking_uri": tracking_uri,
                     "parent_run_id": parent_run_id, "parent_name": name},
        tune_config=tune.TuneConfig(max_concurrent_trials=side_by_side),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(storage).resolve()),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), verbose=0),
    )
    log.info("%d trials, up to %d side by side", len(specs), side_by_side)
    grid = tuner.fit()
    by_key = {}
    for result in grid:
        spec = result.config["trial"]
        if result.error is not None or result.checkpoint is None:
            error = "".join(traceback.format_exception_only(type(result.error), result.error)).strip() \
                if result.error is not None else "no result reported"
            by_key[(spec.config, spec.fold)] = TrialOutcome(spec, None, 0.0, "", error.splitlines()[-1])
            continue
        with result.checkpoint.as_directory() as d:
            oof = pd.read_parquet(Path(d) / OOF_FILE)
        by_key[(spec.config, spec.fold)] = TrialOutcome(spec, oof, float(result.metrics["wall_s"]),
                                                        str(result.metrics["run_id"]))
    return [by_key.get((s.config, s.fold), TrialOutcome(s, None, 0.0, "", "did not run")) for s in specs]


def with_storage(params: Params, storage: Path) -> Params:
    """``params`` with the training checkpoints at an absolute path (trials run in their own
    working folders)."""
    return replace(params, train=replace(params.train, storage_path=str(storage.resolve())))
