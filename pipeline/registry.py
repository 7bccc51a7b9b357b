"""The Model Registry: registering a trained model, the champion rule,
provenance tags and rollback.

The model itself (what it accepts, how it is logged) lives in
:mod:`pipeline.serving`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import RegisterConfig
from pipeline.metrics import is_better
from pipeline.prepared import PreparedData
from pipeline.serving import metrics_on_split
from pipeline.tracking import setup_mlflow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    metric: str
    value: float
    champion_before: str | None
    champion_value: float | None
    promoted: bool

    def summary(self) -> str:
        """One sentence for the stage log: what happened and why."""
        if self.champion_before is None:
            return f"{self.name} v{self.version} is the first model: alias set ({self.metric}={self.value:.4f})"
        verdict = "beats" if self.promoted else "does not beat"
        what = "takes the alias" if self.promoted else "stays without the alias"
        return (f"{self.name} v{self.version} ({self.metric}={self.value:.4f}) {verdict} champion "
                f"v{self.champion_before} ({self.metric}={self.champion_value:.4f}) on the same test "
                f"split: it {what}")


def register(cfg: RegisterConfig, name: str, model_uri: str, test_metrics: dict[str, Any],
             prepared: str | Path, positive_class: str | None = None,
             experiment: str | None = None) -> RegisterResult:
    """Register the run's model; move ``cfg.alias`` to it only if it beats the champion.

    The champion's figure is its tag when it was measured on the same test split
    as this model; otherwise the champion is re-scored on this test split, so the
    comparison is always like for like.
    """
    setup_mlflow(experiment)
    data = PreparedData(prepared)
    return promote(cfg, name, model_uri, test_metrics, data.split_id("test"),
                   lambda uri: metrics_on_split(uri, data, "test", positive_class),
                   provenance(data, test_metrics))


def provenance(data: PreparedData, test_metrics: dict[str, Any]) -> dict[str, str]:
    """Tags that say where a version came from: data hash, git commit, test metrics."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+uncommitted" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    tags = {"dataset_id": data.dataset_id(), "git_commit": commit}
    tags.update({f"test_{k}": f"{v:.6f}" for k, v in test_metrics.items() if isinstance(v, float)})
    return tags


def promote(cfg: RegisterConfig, name: str, model_uri: str, test_metrics: dict[str, Any],
            split_id: str, score_champion: Callable[[str], dict[str, Any]],
            tags: dict[str, str] | None = None) -> RegisterResult:
    """Register ``model_uri`` as a new version of ``name``; apply the champion rule."""
    client = mlflow.MlflowClient()
    if cfg.metric not in test_metrics or not isinstance(test_metrics[cfg.metric], float):
        raise ValueError(f"register.metric '{cfg.metric}' is not among the test metrics "
                         f"{sorted(k for k, v in test_metrics.items() if isinstance(v, float))}")
    value = float(test_metrics[cfg.metric])
    champion = _current(client, name, cfg.alias)
    mv = mlflow.register_model(model_uri, name)
    tags = {**(tags or {}), "split_id": split_id, "run_id": mv.run_id or "",
            f"test_{cfg.metric}": f"{value:.6f}"}
    for key, val in tags.items():
        client.set_model_version_tag(mv.name, mv.version, key, val)
    champ_value = None
    if champion is not None:
        champ_value = _champion_value(champion, cfg, split_id, score_champion)
    promoted = champion is None or is_better(cfg.metric, value, champ_value, cfg.margin)
    if promoted:
        client.set_registered_model_alias(mv.name, cfg.alias, mv.version)
        if champion is not None:
            client.set_model_version_tag(mv.name, mv.version, f"previous_{cfg.alias}",
                                         str(champion.version))
    result = RegisterResult(mv.name, str(mv.version), cfg.metric, value,
                            None if champion is None else str(champion.version), champ_value, promoted)
    client.set_model_version_tag(mv.name, mv.version, "promotion", result.summary())
    log.info(result.summary())
    return result


def rollback(name: str, alias: str = "champion", to: str | None = None) -> tuple[str, str]:
    """Move ``alias`` back to the version it had before (or to version ``to``).

    Returns:
        (version it left, version it points to now)
    """
    client = mlflow.MlflowClient()
    current = _current(client, name, alias)
    if current is None:
        raise ValueError(f"registered model '{name}' has no alias '{alias}' to roll back")
    target = to or current.tags.get(f"previous_{alias}")
    if not target:
        raise ValueError(f"{name} v{current.version} has no previous {alias} recorded; "
                         f"name the version to roll back to")
    client.get_model_version(name, target)  # fails clearly if it does not exist
    client.set_registered_model_alias(name, alias, target)
    client.set_model_version_tag(name, str(current.version), "rolled_back",
                                 f"{alias} moved back to v{target}")
    log.info("%s: alias %s moved from v%s back to v%s", name, alias, current.version, target)
    return str(current.version), str(target)


def _current(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_value(champion, cfg: RegisterConfig, split_id: str, score_champion) -> float:
    tag = champion.tags.get(f"test_{cfg.metric}")
    if champion.tags.get("split_id") == split_id and tag is not None:
        return float(tag)
    log.info("champion v%s was measured on another split: re-scoring it", champion.version)
    return float(score_champion(f"models:/{champion.name}/{champion.version}")[cfg.metric])
