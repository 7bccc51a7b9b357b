"""A self-contained copy of the DVC project with changed params (demo and tests).

``dvc repro`` in the copy runs the real stages on other inputs (synthetic
images, the small real sample) without touching the user's ``params.yaml``,
data or MLflow store: everything lands inside the copy.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.utils import QUIET_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore")
PROJECT_DIRS = ("pipeline", "stages")


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, nested sections key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def scaffold(dest: str | Path, overrides: dict[str, Any], root: Path = REPO_ROOT) -> Path:
    """Copy the project to ``dest`` with ``overrides`` applied to its params; ``dvc init`` it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copyfile(root / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.rmtree(dest / name, ignore_errors=True)
        shutil.copytree(root / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(deep_update(params, overrides), sort_keys=False))
    if not (dest / ".dvc").exists():
        dvc(dest, "init", "--no-scm", "-q")
        dvc(dest, "config", "core.analytics", "false")
    return dest


def dvc_env() -> dict[str, str]:
    """The current environment with telemetry off and this interpreter first on PATH,
    so ``python stages/...`` in ``dvc.yaml`` runs in the same environment."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **QUIET_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def dvc(project: str | Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``project`` with this interpreter's DVC (``env`` adds variables).

    The copy tracks to its own ``mlflow.db`` unless ``env`` names another store.
    """
    own_store = {"MLFLOW_TRACKING_URI": f"sqlite:///{Path(project).resolve() / 'mlflow.db'}"}
    env = {**dvc_env(), **own_store, **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True,
                          env=env, **kwargs)


def repro(project: str | Path, *args: str) -> None:
    """Run ``dvc repro`` in ``project``, streaming its output."""
    dvc(project, "repro", *args)
