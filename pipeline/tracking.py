"""MLflow tracking set-up: the one place that points MLflow at a store.

Every module that talks to MLflow calls :func:`setup_mlflow` first (Ray
workers and actors with the URI the driver resolved), so the location is
decided here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's client otherwise retries a dead server for minutes before saying anything:
# about 10 s of retries bound how long a run waits to learn that the server is gone.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class TrackingUnavailable(UserError):
    """The MLflow tracking server cannot be reached."""


def dvc_experiment() -> str:
    """The DVC experiment this process runs in (``dvc exp run`` sets ``DVC_EXP_NAME``), or
    ``workspace``: the first part of every MLflow run name."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the local ``mlflow.db`` that ``mlflow ui``
    opens by default, as an absolute path so Ray workers in other folders find it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def setup_mlflow(experiment: str | None = None, uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default :func:`tracking_uri`) and select ``experiment``
    if given; return the URI.

    Raises:
        TrackingUnavailable: a tracking server that does not answer, named, within seconds.
    """
    import mlflow

    for key, value in HTTP_DEFAULTS.items():  # before any request; Ray workers inherit them
        os.environ.setdefault(key, value)
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    if is_remote(uri) and not reachable(uri):
        raise TrackingUnavailable(f"the MLflow tracking server {uri} does not answer: start it, or "
                                  "set MLFLOW_TRACKING_URI to one that runs (unset: a local mlflow.db)")
    if experiment:
        mlflow.set_experiment(experiment)
    return uri


def is_remote(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (HTTP) rather than a local store."""
    return uri.startswith(("http://", "https://"))


def reachable(uri: str) -> bool:
    """Whether the tracking store at ``uri`` answers a request now."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return True
    except (MlflowException, OSError):
        return False


def use_tracking_uri(uri: str) -> None:
    """Point this process, and every process it starts, at ``uri`` (a Ray Tune trial that runs
    the normal training driver, which reads the URI from the environment)."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    setup_mlflow(uri=uri)


@contextlib.contextmanager
def mlflow_run(uri: str, kept: str, **start_args: Any) -> Iterator[Any]:
    """An MLflow run that ends FINISHED when the block ends and FAILED when it raises.

    ``start_args`` go to ``mlflow.start_run``. If the tracking server went away mid-run,
    :class:`TrackingUnavailable` says so and what ``kept`` (say, the checkpoints) a re-run
    resumes from.
    """
    import mlflow

    run = mlflow.start_run(**start_args)
    try:
        yield run
    except BaseException as exc:
        end_failed_run(uri, exc, kept)
        raise
    mlflow.end_run()


@dataclass(frozen=True)
class RunLogger:
    """Logging to one run by id, without an active fluent run (rank 0 of Ray Train, the external
    validation report)."""

    client: Any  # mlflow.MlflowClient
    run_id: str

    @classmethod
    def connect(cls, uri: str, run_id: str) -> "RunLogger":
        import mlflow

        setup_mlflow(uri=uri)
        return cls(mlflow.MlflowClient(), run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One request for an epoch's metrics (a remote server answers each request on its own)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def end_failed_run(uri: str, exc: BaseException, kept: str) -> None:
    """End the active run as FAILED; if the tracking server is gone, say so instead.

    Raises:
        TrackingUnavailable: the server went away mid-run; ``kept`` says what a re-run resumes from.
    """
    import mlflow

    if is_remote(uri) and not reachable(uri):
        with contextlib.suppress(Exception):  # forgets the run here; the server keeps it RUNNING
            mlflow.end_run(status="FAILED")
        raise TrackingUnavailable(
            f"lost the MLflow tracking server {uri} during training ({type(exc).__name__}); {kept}: "
            "start the server again and re-run, training resumes from the last checkpoint in the "
            "same MLflow run") from exc
    mlflow.end_run(status="FAILED")


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Attach ``path`` to the (possibly finished) run ``run_id`` in the current store; a folder's
    contents go under ``artifact_path``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)
