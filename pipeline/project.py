"""A self-contained copy of the DVC project with changed params (demo and tests).

``dvc repro`` in the copy runs the real stages on other inputs (synthetic
images, the small real sample) without touching the user's ``params.yaml``,
data or MLflow store: everything lands inside the copy. With ``git=True`` the
copy is its own git repository, so DVC's experiment commands work in it.
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

from pipeline.env import QUIET_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("dvc.yaml", "crossval/dvc.yaml", "validate/dvc.yaml", "params.yaml", ".dvcignore")
PROJECT_DIRS = ("pipeline", "stages")
STAGES = ("download", "prepare", "augment", "train", "evaluate", "register", "score")  # dvc.yaml's, in order
OFFLINE_TEMPLATE = "offline_plots.html"  # in .dvc/, where plots.html_template points
# What a copy makes that does not belong in its git history (DVC ignores its own outputs).
GIT_IGNORED = ("*.zip", "/mlflow.db", "/mlruns/", "/mlartifacts/", "/checkpoints/", "/logs/",
               "/dvc_plots/", "__pycache__/", "*.pyc")
DEMO_IDENTITY = {"user.name": "pipeline demo", "user.email": "demo@localhost"}


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, nested sections key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def scaffold(dest: str | Path, overrides: dict[str, Any], root: Path = REPO_ROOT,
             git: bool = False) -> Path:
    """Copy the project to ``dest`` with ``overrides`` applied to its params; ``dvc init`` it
    (inside a new git repository with the copy as its first commit if ``git``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.rmtree(dest / name, ignore_errors=True)
        shutil.copytree(root / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(deep_update(params, overrides), sort_keys=False))
    if not (dest / ".dvc").exists():
        if git:
            git_init(dest)
        dvc(dest, "init", "-q", *(() if git else ("--no-scm",)))
        dvc(dest, "config", "core.analytics", "false")
        dvc(dest, "config", "core.autostage", "true")  # DVC stages its own changes in git
        offline_plots(dest)
        if git:
            git_commit(dest, "Project copy: code, dvc.yaml and params.yaml")
    return dest


def offline_plots(project: str | Path) -> Path:
    """Make ``dvc plots show`` in ``project`` draw with no network (the Vega libraries
    inlined in the page template, see :func:`pipeline.plots.write_offline_template`)."""
    from pipeline.plots import write_offline_template

    path = write_offline_template(Path(project) / ".dvc" / OFFLINE_TEMPLATE)
    dvc(project, "config", "plots.html_template", OFFLINE_TEMPLATE)
    return path


def git(project: str | Path, *args: str) -> str:
    """Run ``git <args>`` in ``project``; its standard output."""
    return subprocess.run(["git", *args], cwd=project, check=True, capture_output=True,
                          text=True).stdout


def git_init(project: str | Path) -> None:
    """A new repository in ``project``, ignoring what the pipeline makes beside its outputs;
    with a local identity only where git has none (DVC's experiments commit too)."""
    project = Path(project)
    git(project, "init", "-q")
    (project / ".gitignore").write_text("\n".join(GIT_IGNORED) + "\n")
    for key, value in DEMO_IDENTITY.items():
        if subprocess.run(["git", "config", key], cwd=project, capture_output=True).returncode:
            git(project, "config", key, value)


def git_commit(project: str | Path, message: str) -> None:
    """Commit everything git does not ignore in ``project``, if anything changed."""
    git(project, "add", "-A")
    if git(project, "status", "--porcelain").strip():
        git(project, "commit", "-q", "-m", message)


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
