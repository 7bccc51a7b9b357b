"""Batch scoring with Ray Data: the registered model over a folder or zip of images.

The driver resolves the model URI once (an alias becomes a fixed version, so
every actor scores with the same model even if the alias moves mid-job), lists
the inputs, and streams ``map_batches`` through a pool of stateful
:class:`BatchPredictor` actors into one Parquet file. An unreadable image
becomes a row with its error; it never stops the job.

Decoding tasks take one CPU of Ray's accounting, a CPU actor ``cpus_per_actor``, a GPU actor
its GPU (and the one CPU Ray Data adds); by default there is one actor per CPU, each on one
torch thread (``threads_per_actor``: the node's cores / actors), since decoding needs a
fraction of what the forward pass does (docs/performance.md).
With no cluster configured (no ``RAY_ADDRESS``, CPU; up to ``local_max_images``) the same decode
and predictor code runs in this process: one thread decoding ahead of a forward pass on every
core. On one 2-core machine that scored 10,512 zipped cells faster than Ray Data's actors,
which pay for Ray's own processes and split the cores (docs/performance.md); on a machine
with many cores Ray Data may win (unmeasured: set ``local_max_images: 0``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from pipeline.cluster import check_scoring, init_ray
from pipeline.config import ScoreConfig
from pipeline.console import adopt_library_loggers
from pipeline.data.prepared import PreparedData
from pipeline.files import atomic_path
from pipeline.serving.predictions import (
    patient_summary,
    patients_path,
    predictions_schema,
    score_rows,
    write_predictions,
)
from pipeline.serving.pyfunc import checkpoint_header, checkpoint_of
from pipeline.serving.score_inputs import (
    decode_batch,
    decoded_batches,
    list_inputs,
    split_inputs,
)
from pipeline.serving.screening import InputLimits
from pipeline.tracking import setup_mlflow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    output: Path
    model_uri: str
    n_images: int
    n_errors: int
    n_rejected: int
    skipped: tuple[str, ...]  # the system files skipped (Thumbs.db, .DS_Store, __MACOSX/)
    images_per_s: float
    first_row_s: float = 0.0  # from the call to the first row written
    engine: str = "ray"  # "ray" (Ray Data actors) or "local" (a small job in this process)


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # models:/<name>/<version> or the given URI
    name: str
    version: str


def resolve_model(uri: str) -> ResolvedModel:
    """Turn ``models:/<name>@<alias>`` into the version it points to now."""
    import mlflow

    if uri.startswith("models:/") and "@" in uri:
        name, alias = uri[len("models:/"):].split("@", 1)
        try:
            mv = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"no model version has alias '{alias}' in registered model "
                             f"'{name}' ({exc.message}). Run the register stage first, or set "
                             "score.model_uri.") from None
        return ResolvedModel(f"models:/{name}/{mv.version}", name, str(mv.version))
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].partition("/")
        return ResolvedModel(uri, name, version)
    return ResolvedModel(uri, "", "")


class BatchPredictor:
    """Ray Data actor: builds the registered model's predictor once, then scores batches.

    The model comes as its checkpoint (a path, or its bytes in Ray's object store), the file the
    registered pyfunc builds the same predictor from: an actor needs neither MLflow nor access
    to its store (loading the pyfunc took 6.6 s of each actor's start, the checkpoint 0.15 s).
    A batch arrives decoded (separate decoding tasks) or as paths (``size`` given): then
    the actor decodes it itself, and with two calls in flight one batch decodes while the
    other runs the forward pass (one forward at a time, holding every torch thread).
    """

    def __init__(self, checkpoint, version: str, tta: bool = False, threads: int = 0, size: int = 0,
                 in_worker: bool = True, ood_threshold: float = 0.0):
        import io
        import threading

        from pipeline.console import quiet_worker
        from pipeline.env import set_quiet_env
        from pipeline.serving.inference import Predictor

        set_quiet_env()
        if in_worker:  # in the caller's process (a small job) its logging stays as it is
            quiet_worker()
        if not isinstance(checkpoint, (str, Path)):  # an object-store reference to its bytes
            import ray

            checkpoint = io.BytesIO(ray.get(checkpoint))
        self.predictor = Predictor.from_checkpoint(checkpoint, tta=tta)
        self.version, self.ood_threshold = version, ood_threshold or None
        self.threads, self._threads_set = threads, threading.local()
        self.size, self._forward = size, threading.Lock()

    def _use_threads(self) -> None:
        """Torch's threads in the calling thread. Ray sets an actor's OpenMP threads to its CPU
        reservation, and OpenMP keeps the count per thread: set in ``__init__`` only, the
        calls (threads of the actor) ran on one (measured: about half the forward speed)."""
        import torch

        if self.threads and not getattr(self._threads_set, "done", False):
            torch.set_num_threads(self.threads)
            self._threads_set.done = True

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        if "pixels" not in batch:
            batch = decode_batch(pd.DataFrame({"path": batch["path"], "container": batch["container"]}),
                                 self.size, self.predictor.limits)
        with self._forward:
            self._use_threads()
            preds = score_rows(self.predictor, batch["pixels"], [str(e) or None for e in batch["error"]],
                               [str(r) or None for r in batch["rejected"]], threshold=self.ood_threshold,
                               stats=batch.get("appearance"))
        preds.insert(0, "path", batch["path"])
        preds["model_version"] = self.version
        return preds


def score(cfg: ScoreConfig, model_uri: str, output: str | Path,
          prepared: str | Path | None = None, group_of: Callable[[str], str] | None = None,
          patients: bool = False) -> ScoreResult:
    """Score ``cfg.input`` (a folder or zip) with ``model_uri``; write a Parquet table.

    With ``cfg.input`` empty, scores the test split of the ``prepared`` dataset.
    With ``patients``, also writes ``<output>_patients.parquet``, grouped by
    ``group_of`` (path -> patient id; None: the dataset has no patients, the table is empty).
    """
    import time

    start = time.perf_counter()
    if cfg.input:
        inputs, skipped = list_inputs(cfg.input)
    elif prepared is not None:
        inputs, skipped = split_inputs(PreparedData(prepared)), []
    else:
        raise ValueError("set score.input to a folder or zip of images to score")
    setup_mlflow()
    model = resolve_model(model_uri)
    if skipped:
        log.info("skipping %d system files: %s", len(skipped), ", ".join(skipped[:5]))
    checkpoint = checkpoint_of(model.uri)
    meta, limits = checkpoint_header(checkpoint)
    size, schema = int(meta["image_size"]), predictions_schema(meta["class_names"])
    predictor_args = {"checkpoint": checkpoint, "version": model.version, "tta": cfg.tta,
                      "ood_threshold": cfg.ood_threshold}
    engine = "local" if runs_locally(cfg, len(inputs)) else "ray"
    t0 = time.perf_counter()
    batches = (_local_batches(inputs, cfg, size, predictor_args) if engine == "local"
               else _ray_batches(inputs, cfg, size, predictor_args, limits))
    n, n_err, first = write_predictions(batches, Path(output), schema, len(inputs))
    rate = n / max(time.perf_counter() - t0, 1e-9)
    if n != len(inputs):
        raise RuntimeError(f"scored {n} rows for {len(inputs)} inputs; output not trusted")
    log.info("scored %d images with %s (v%s) %s: %d errors, %.1f img/s -> %s", n,
             model.name or model.uri, model.version,
             "in this process" if engine == "local" else "with Ray Data", n_err, rate, output)
    if patients:
        summary = patient_summary(pd.read_parquet(output), group_of, meta["class_names"])
        with atomic_path(patients_path(output)) as tmp:
            summary.to_parquet(tmp, index=False)
    n_rejected = int((pd.read_parquet(output, columns=["status"])["status"] == "rejected").sum())
    return ScoreResult(Path(output), model.uri, n, n_err, n_rejected, tuple(skipped), rate,
                       (first or time.perf_counter()) - start, engine)


def actor_threads(cfg: ScoreConfig, actors: int) -> int:
    """Torch threads per predictor: ``threads_per_actor``, else this node's cores / ``actors``
    (0 on GPU: leave torch alone)."""
    import os

    if cfg.use_gpu:
        return 0
    if cfg.threads_per_actor:
        return cfg.threads_per_actor
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // actors)


def actor_count(cfg: ScoreConfig) -> int:
    """``score.concurrency``; 0 (auto): one actor per GPU of the cluster with ``use_gpu``, else
    one per ``cpus_per_actor`` of its CPUs, at most 8. Measured on 2 cores, 20,000 images: two
    one-thread actors scored 1.17-1.20x the plain program's images/s, one two-thread actor
    0.88-1.03x (likely OpenMP's team of two losing a core to Ray's own processes, as in
    training; docs/development.md, measurement history)."""
    import ray

    if cfg.concurrency:
        return cfg.concurrency
    resources = ray.cluster_resources()
    if cfg.use_gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, min(8, int(resources.get("CPU", 1) // cfg.cpus_per_actor)))


def runs_locally(cfg: ScoreConfig, n_images: int) -> bool:
    """A small job with no cluster configured scores in-process."""
    import os

    return n_images <= cfg.local_max_images and not cfg.use_gpu and not os.environ.get("RAY_ADDRESS")


def _local_batches(inputs: pd.DataFrame, cfg: ScoreConfig, size: int,
                   predictor_args: dict) -> Iterable[pd.DataFrame]:
    """The Ray path's decode and predictor code in this process: a thread decodes the next
    batch while torch runs the forward pass of this one (as the actors do)."""
    from concurrent.futures import ThreadPoolExecutor

    predictor = BatchPredictor(**predictor_args, threads=actor_threads(cfg, 1), in_worker=False)
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        # two batches decoding ahead, as the fastest plain layout (three in memory at most)
        for batch in decoded_batches(inputs, size, predictor.predictor.limits, cfg.batch_size, pool, ahead=2):
            yield predictor(batch)


def _ray_batches(inputs: pd.DataFrame, cfg: ScoreConfig, size: int, predictor_args: dict,
                 limits: InputLimits | None) -> Iterable[pd.DataFrame]:
    """Ray Data: paths into a pool of predictor actors (decoding in the actors on CPU,
    pipelined with the forward pass; in separate tasks feeding GPU actors, with the model's
    input ``limits``)."""
    init_ray()  # before Ray is imported here: it reads its settings on import
    import ray
    from ray.data import ActorPoolStrategy

    adopt_library_loggers()  # Ray Data sets up its console logging on import
    ray.data.DataContext.get_current().print_on_execution_start = False  # the plan: Ray's log
    actors = actor_count(cfg)
    check_scoring(cfg, actors)  # what cannot fit fails now, not after Ray Data waits for it
    # the checkpoint's bytes, once, for every actor wherever it runs
    checkpoint = ray.put(Path(predictor_args["checkpoint"]).read_bytes())
    predictor_args = {**predictor_args, "checkpoint": checkpoint, "threads": actor_threads(cfg, actors)}
    ds = ray.data.from_items(inputs.to_dict("records"))
    in_actor = decode_in_actor(cfg)
    if not in_actor:
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": size, "limits": limits},
                            batch_size=cfg.batch_size,
                            batch_format="pandas", num_cpus=1)
    ds = ds.map_batches(
        BatchPredictor, fn_constructor_kwargs={**predictor_args, "size": size if in_actor else 0},
        batch_size=cfg.batch_size, batch_format="numpy",
        # a GPU actor: num_gpus only (Ray Data calls both on one map experimental; it reserves
        # one CPU with a GPU itself)
        **({"num_gpus": 1} if cfg.use_gpu else {"num_cpus": cfg.cpus_per_actor}),
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2,
                                  enable_true_multi_threading=in_actor),
    )
    return ds.iter_batches(batch_format="pandas", batch_size=None)


def decode_in_actor(cfg: ScoreConfig) -> bool:
    """``score.decode``: auto decodes in the actors on CPU, in separate tasks for GPU actors."""
    return cfg.decode == "actor" or (cfg.decode == "auto" and not cfg.use_gpu)


