"""Distributed training with Ray Train: the driver.

:func:`train` reads like Ray Train's own examples: the data goes into Ray's object store, one
MLflow run is opened (a context manager that ends it FINISHED or FAILED), a ``TorchTrainer``
runs :func:`pipeline.training.worker.train_loop_per_worker` on each worker, and the kept
checkpoint comes back as the result.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cluster import fit_training, init_ray
from pipeline.config import TrainConfig, UserError, flatten
from pipeline.data.prepared import PreparedData, Split
from pipeline.data.stain import stain_reference
from pipeline.files import atomic_path
from pipeline.models import model_info
from pipeline.serving.inference import ModelMeta, attach_reject_option
from pipeline.serving.pyfunc import log_model
from pipeline.serving.screening import InputLimits
from pipeline.tracking import mlflow_run, setup_mlflow
from pipeline.training import run_notes
from pipeline.training.runs import (
    RUN_ID_FILE,
    RunStore,
    previous_run_id,
    run_history,
    run_store,
)
from pipeline.training.worker import (
    DIVERGED,
    MODEL_FILE,
    WorkerConfig,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; no model came out of the run."""


@dataclass(frozen=True)
class RunOptions:
    """How a training run is recorded: a trial of a sweep or a cross-validation fold is a child
    of ``parent_run_id`` and needs no MLflow model (``register_model=False``)."""

    extra_params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    run_name: str | None = None
    register_model: bool = True


@dataclass(frozen=True)
class TrainResult:
    """Where the kept model went and how training went."""

    model_path: Path
    run_id: str
    model_uri: str
    best_epoch: int
    history: pd.DataFrame


def train(cfg: TrainConfig, policy: dict[str, Any], prepared: str | Path, out_dir: str | Path,
          experiment: str, options: RunOptions = RunOptions()) -> TrainResult:
    """Train ``cfg.model`` on ``prepared`` with Ray Train; kept checkpoint (``cfg.keep``) → ``out_dir``.

    ``policy`` is the Albumentations policy in its serialised form
    (:func:`pipeline.data.augment.policy`, or the file the ``augment`` stage wrote).
    """
    data = PreparedData(Path(prepared).resolve())
    meta = _meta(cfg, data)
    uri = setup_mlflow(experiment)
    init_ray()
    cfg = fit_training(cfg)  # num_workers: auto resolved; what cannot fit fails now, not in 60 s
    params = _run_params(cfg, policy, options)
    store = run_store(cfg.storage_path, cfg.model, params, data)
    with mlflow_run(uri, kept=f"the checkpoints are kept in {store.storage}/{store.name}",
                    **_run_args(cfg, data, meta, experiment, store, options)) as run:
        _log_inputs(run.info.run_id, store, data, params, policy, experiment)
        worker = WorkerConfig(cfg, policy, meta, uri, run.info.run_id,
                              _to_object_store(data.split("train")), _to_object_store(data.split("val")))
        result = _trainer(cfg, store, worker).fit()
        _raise_if_diverged(run.info.run_id, store, cfg)
        outcome = _finish(result, Path(out_dir), data, run.info.run_id, options.register_model, cfg.keep)
    store.delete()  # the run finished: a later run with the same settings starts afresh
    return outcome


def _meta(cfg: TrainConfig, data: PreparedData) -> ModelMeta:
    """What a checkpoint records about its model: name, classes, image size, normalisation."""
    info = model_info(cfg.model)
    stain = stain_reference(data.split("train").images) if cfg.stain_norm else ()
    return ModelMeta(cfg.model, tuple(data.class_names), data.image_size, info.mean, info.std, stain)


def _run_params(cfg: TrainConfig, policy: dict[str, Any], options: RunOptions) -> dict[str, Any]:
    """The flat params logged to MLflow; their hash also names the run's checkpoint folder."""
    params = flatten({"train": asdict(cfg), **options.extra_params})
    params["augment.policy"] = ",".join(t["__class_fullname__"] for t in policy["transform"]["transforms"])
    return params


def _run_args(cfg: TrainConfig, data: PreparedData, meta: ModelMeta, experiment: str,
              store: RunStore, options: RunOptions) -> dict[str, Any]:
    """``mlflow.start_run`` arguments: an interrupted run with the same settings continues."""
    name = options.run_name or run_notes.run_name(cfg.model, cfg.regime, meta.image_size, cfg.epochs)
    return {"run_id": previous_run_id(store), "parent_run_id": options.parent_run_id, "run_name": name,
            "description": run_notes.run_description(cfg, data, experiment),
            "log_system_metrics": cfg.system_metrics}


def _log_inputs(run_id: str, store: RunStore, data: PreparedData, params: dict[str, Any],
                policy: dict[str, Any], experiment: str) -> None:
    """Params, data inputs and the policy, logged before training starts."""
    import mlflow

    store.write(RUN_ID_FILE, run_id)
    run_notes.log_inputs(data, experiment)
    mlflow.log_params({**params, "n_train": len(data.split("train")), "n_val": len(data.split("val")),
                       "class_names": ",".join(data.class_names), "image_size": data.image_size})
    mlflow.log_dict(policy, "augment_policy.yaml")


def _to_object_store(split: Split):
    """One split's images and labels in Ray's object store, shared by the workers of a node."""
    import ray

    return ray.put((np.asarray(split.images), split.labels))


def _trainer(cfg: TrainConfig, store: RunStore, worker: WorkerConfig):
    """The ``TorchTrainer`` of one run: workers from params, checkpoints in ``store``."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        partial(train_loop_per_worker, worker),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=store.name,
            storage_path=store.storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # details: Ray's session logs
        ),
    )


def _raise_if_diverged(run_id: str, store: RunStore, cfg: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` if a worker tagged the run as diverged."""
    import mlflow

    diverged = mlflow.get_run(run_id).data.tags.get(DIVERGED)
    if diverged:
        store.delete()  # resuming would diverge again
        raise TrainingDiverged(f"training diverged: {diverged}; no model was saved or logged. Lower "
                               f"train.lr (now {cfg.lr:g}) or check the data, then run again")


def _finish(result, out_dir: Path, data: PreparedData, run_id: str, register_model: bool,
            keep: str) -> TrainResult:
    """The kept checkpoint to ``out_dir``, its figures and (if asked) the MLflow model logged."""
    import mlflow

    kept = _kept_checkpoint(result, out_dir / MODEL_FILE, keep)
    train, val = data.split("train"), data.split("val")
    rows = data.rows("train")
    ood = attach_reject_option(out_dir / MODEL_FILE, train.images, train.labels, val.images,
                               InputLimits.of(rows["width"].to_numpy(), rows["height"].to_numpy()))
    mlflow.log_metrics({"best_epoch": kept["epoch"], "best_val_loss": kept["val_loss"],  # names kept
                        "best_val_acc": kept["val_acc"],
                        "ood_threshold_features": ood.features.threshold,
                        "ood_threshold_appearance": ood.appearance.threshold})
    mlflow.log_artifact(str(out_dir / MODEL_FILE), artifact_path="checkpoint")
    model_uri = (log_model(out_dir / MODEL_FILE, np.asarray(train.images[0]), data.class_names)
                 if register_model else "")
    log.info("kept epoch %d: val_loss %.4f val_acc %.4f", kept["epoch"], kept["val_loss"],
             kept["val_acc"])
    return TrainResult(out_dir / MODEL_FILE, run_id, model_uri, int(kept["epoch"]), run_history(run_id))


def _kept_checkpoint(result, dest: Path, keep: str) -> dict[str, Any]:
    """Copy the weights of the lowest-val_loss checkpoint (``keep`` "best") or of the last
    epoch's (``"last"``; Ray always keeps the latest) to ``dest``; return its metrics."""
    checkpoint, metrics = (min(result.best_checkpoints, key=lambda c: c[1]["val_loss"]) if keep == "best"
                           else (result.checkpoint, result.metrics))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d, atomic_path(dest) as tmp:
        shutil.copyfile(Path(d) / MODEL_FILE, tmp)
    return metrics
