"""Run storage and resume bookkeeping for training.

A training run's Ray Train folder is named by a hash of its settings and data
(:func:`run_store`), so an interrupted ``dvc repro`` with unchanged params
resumes from its last checkpoint and continues the same MLflow run
(:func:`previous_run_id`), while any change starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs

from pipeline.data.prepared import PreparedData

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
HISTORY_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s",
                   "images_per_s", "trainable_params")


@dataclass(frozen=True)
class RunStore:
    """One Ray Train run folder, ``<storage>/<name>``, wherever ``train.storage_path`` is:
    a local or shared-filesystem path, or a URI pyarrow knows (``s3://``, ``gs://``,
    ``file://``). Every node must reach it; Ray Train writes checkpoints there."""

    storage: str  # Ray Train's storage_path: an absolute path or a URI
    name: str

    @classmethod
    def at(cls, storage_path: str, name: str) -> "RunStore":
        if "://" not in storage_path:
            storage_path = str(Path(storage_path).resolve())
        return cls(storage_path.rstrip("/"), name)

    @cached_property
    def _location(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The filesystem and the run folder's path on it (resolved once: for s3://
        pyarrow may ask the bucket for its region)."""
        fs, root = pyarrow.fs.FileSystem.from_uri(self.storage)
        return fs, f"{root.rstrip('/')}/{self.name}"

    def read(self, file: str) -> str | None:
        """The text of ``file`` in the run folder, or None when it is not there."""
        fs, path = self._location
        if fs.get_file_info(f"{path}/{file}").type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(f"{path}/{file}") as f:
            return f.read().decode()

    def write(self, file: str, text: str) -> None:
        fs, path = self._location
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{file}") as f:
            f.write(text.encode())

    def delete(self) -> None:
        fs, path = self._location
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)


def run_store(storage_path: str, model: str, params: dict[str, Any], data: PreparedData) -> RunStore:
    """Ray Train storage folder named by a hash of the settings and the data.

    Ray Train resumes a run whose ``(storage_path, name)`` already exists, so an
    interrupted ``dvc repro`` with unchanged params picks up from its last
    checkpoint, while any change of params or data starts a new run.
    """
    key = json.dumps(params, sort_keys=True, default=str)
    key += data.split_id("train") + data.split_id("val")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return RunStore.at(storage_path, f"{model}-{digest}")


def previous_run_id(store: RunStore) -> str | None:
    """MLflow run of an interrupted attempt at this run, to continue it."""
    import mlflow

    text = store.read(RUN_ID_FILE)
    if text is None:
        return None
    run_id = text.strip()
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    log.info("resuming interrupted run %s from %s/%s", run_id, store.storage, store.name)
    return run_id


def run_history(run_id: str) -> pd.DataFrame:
    """Per-epoch metrics of a run, one row per epoch, read back from MLflow."""
    import mlflow

    client = mlflow.MlflowClient()
    frames = [pd.DataFrame([(m.step, m.value) for m in client.get_metric_history(run_id, k)],
                           columns=["epoch", k]).drop_duplicates("epoch", keep="last").set_index("epoch")
              for k in HISTORY_METRICS]
    return pd.concat(frames, axis=1).sort_index().reset_index()
