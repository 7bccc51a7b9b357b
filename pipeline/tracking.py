"""MLflow tracking set-up: the one place that points MLflow at a store.

Every module that talks to MLflow calls :func:`setup_mlflow` first (Ray
workers and actors with the URI the driver resolved), so the location is
decided here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the local ``mlflow.db`` that ``mlflow ui``
    opens by default, as an absolute path so Ray workers in other folders find it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def setup_mlflow(experiment: str | None = None, uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default :func:`tracking_uri`) and select ``experiment``
    if given; return the URI."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    if experiment:
        mlflow.set_experiment(experiment)
    return uri
