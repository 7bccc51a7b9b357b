"""The Model Registry: registering a trained model, the champion rule,
provenance tags and rollback.

The model itself (what it accepts, how it is logged) lives in
:mod:`pipeline.serving.pyfunc`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.config import RegisterConfig
from pipeline.console import into_log
from pipeline.data.prepared import PreparedData
from pipeline.metrics import HEADLINE_METRICS, is_better
from pipeline.serving.pyfunc import CONTRACT, INPUT_COLUMN
from pipeline.serving.registry_lock import registry_lock
from pipeline.tracking import setup_mlflow

log = logging.getLogger(__name__)


TRAIN_GROUPS_ARTIFACT = "registry/train_groups.json"


class ComparisonRefused(Exception):
    """The new model and the champion have no fair ground to be compared on."""


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    metric: str
    value: float  # the new model's figure on ``basis``
    champion_before: str | None
    champion_value: float | None  # the champion's figure on ``basis``
    promoted: bool
    basis: str = "the test split"  # what both figures were measured on
    refused: str | None = None  # why there was no comparison, if there was none

    def summary(self) -> str:
        """One sentence for the stage log: what happened and why."""
        if self.champion_before is None:
            return f"{self.name} v{self.version} is the first model: alias set ({self.metric}={self.value:.4f})"
        if self.refused:
            return (f"{self.name} v{self.version} stays without the alias: no fair comparison with "
                    f"champion v{self.champion_before}: {self.refused}")
        verdict = "beats" if self.promoted else "does not beat"
        what = "takes the alias" if self.promoted else "stays without the alias"
        return (f"{self.name} v{self.version} ({self.metric}={self.value:.4f}) {verdict} champion "
                f"v{self.champion_before} ({self.metric}={self.champion_value:.4f}) on {self.basis}: "
                f"it {what}")


def register(cfg: RegisterConfig, name: str, model_uri: str, test_metrics: dict[str, Any],
             prepared: str | Path, positive_class: str | None = None,
             experiment: str | None = None) -> RegisterResult:
    """Register the run's model; move ``cfg.alias`` to it only if it beats the champion.

    The comparison is always like for like and never on patients either model
    trained on: on the same test split, the champion's recorded figure; otherwise
    both models are scored on the test patients the champion did not train on
    (the new model trained on none of them), or the comparison is refused.
    """
    setup_mlflow(experiment)
    data = PreparedData(prepared)
    groups = training_groups(data)
    test_groups = {str(g) for g in data.split("test").groups}

    def compare_on_unseen(champion) -> tuple[float, float, str]:
        unseen = sorted(test_groups - champion_training_groups(champion))
        if not unseen:
            raise ComparisonRefused(
                f"it trained on all {len(test_groups)} patients of this test split (the split moved or "
                "the data grew). Compare on new patients, or move the alias deliberately with "
                f"`pipeline rollback --name {name} --to <version>`")
        new = metrics_on_split(model_uri, data, "test", positive_class, unseen)[cfg.metric]
        old = metrics_on_split(f"models:/{champion.name}/{champion.version}", data, "test",
                               positive_class, unseen)[cfg.metric]
        if not (np.isfinite(new) and np.isfinite(old)):
            raise ComparisonRefused(f"{cfg.metric} is undefined on the {len(unseen)} test patients "
                                    "it did not train on (one class only)")
        return new, old, f"{len(unseen)} test patients neither model trained on"

    tags = {**provenance(data, test_metrics), "train_groups_sha256": groups_digest(groups)}
    result = promote(cfg, name, model_uri, test_metrics, data.split_id("test"), compare_on_unseen, tags,
                     run_files={TRAIN_GROUPS_ARTIFACT: {"groups": groups}})
    mlflow.MlflowClient().update_registered_model(name, description=model_description(data.class_names, cfg))
    return result


def version_description(result: RegisterResult, tags: dict[str, str]) -> str:
    """A version's description: whether and why it took the alias, and where it came from."""
    figures = ", ".join(f"{k.removeprefix('test_')} {float(v):.4f}" for k, v in tags.items()
                        if k.startswith("test_"))
    return (f"{result.summary()}.\n\nTest figures: {figures}.\n\nTraining run `{tags.get('run_id')}`, "
            f"dataset `{tags.get('dataset_id')}`, code {tags.get('git_commit')}.")


def model_description(class_names: list[str], cfg: RegisterConfig) -> str:
    """The registered model's description: what it classifies, its input contract, the rule."""
    return (f"Classifies single-cell image crops as one of: {', '.join(class_names)}.\n\n"
            f"## Input contract\n\n{CONTRACT}\n"
            "## Validation\n\nTrained on patients of the train split, threshold and "
            "temperature chosen on validation patients, measured on test patients no version "
            "trained on, with patient-bootstrap confidence intervals (the training run's "
            "`reports/evaluate.md`). Probabilities are softmax outputs; the class is the most "
            "probable one (threshold 0.5 for two classes), and the run's report gives the "
            "operating threshold for a target sensitivity.\n\n"
            f"## Champion rule\n\nThe alias `{cfg.alias}` moves to a new version only when its test "
            f"`{cfg.metric}` beats the champion's by more than {cfg.margin}, measured on the same "
            "test split, or else on test patients neither model trained on; each version's "
            "`promotion` tag says why it did or did not move.\n")


def training_groups(data: PreparedData) -> list[str]:
    """The patients (groups) a model trained on: those of the train and validation splits."""
    return sorted({str(g) for split in ("train", "val") for g in data.split(split).groups})


def groups_digest(groups: list[str]) -> str:
    """A short content hash of a sorted group list (a tag; the list itself is an artifact)."""
    return hashlib.sha256("\n".join(sorted(groups)).encode()).hexdigest()[:16]


def champion_training_groups(champion) -> set[str]:
    """The training patients recorded with a registered version.

    Raises:
        ComparisonRefused: when the version has none recorded (registered before they were).
    """
    try:
        recorded = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/{TRAIN_GROUPS_ARTIFACT}")
    except (MlflowException, OSError):
        raise ComparisonRefused(f"v{champion.version} has no record of its training patients "
                                f"({TRAIN_GROUPS_ARTIFACT}), so a fair test set cannot be chosen; "
                                "re-register it with this version of the pipeline") from None
    groups = [str(g) for g in recorded["groups"]]
    if champion.tags.get("train_groups_sha256") not in (None, groups_digest(groups)):
        raise ComparisonRefused(f"v{champion.version}'s recorded training patients do not match its "
                                "train_groups_sha256 tag")
    return set(groups)


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
    # The headline figures only: every other test metric is on the run, not 30 tags a version.
    tags.update({f"test_{k}": f"{test_metrics[k]:.6f}" for k in HEADLINE_METRICS
                 if isinstance(test_metrics.get(k), float)})
    return tags


def promote(cfg: RegisterConfig, name: str, model_uri: str, test_metrics: dict[str, Any],
            split_id: str, compare_on_unseen: Callable[[Any], tuple[float, float, str]],
            tags: dict[str, str] | None = None,
            run_files: dict[str, dict[str, Any]] | None = None,
            on_lock_busy: Callable[[], None] | None = None) -> RegisterResult:
    """Register ``model_uri`` as a new version of ``name``; apply the champion rule.

    ``compare_on_unseen(champion)`` returns (new figure, champion figure, what they
    were measured on) when the champion was measured on another test split, or
    raises :class:`ComparisonRefused`. ``run_files`` (artifact path -> JSON content) go
    to the version's run before any other register can see the version.
    ``on_lock_busy`` is :func:`registry_lock`'s ``on_busy`` (a test hook).
    """
    client = mlflow.MlflowClient()
    if cfg.metric not in test_metrics or not isinstance(test_metrics[cfg.metric], float):
        raise ValueError(f"register.metric '{cfg.metric}' is not among the test metrics "
                         f"{sorted(k for k, v in test_metrics.items() if isinstance(v, float))}")
    value = float(test_metrics[cfg.metric])
    with registry_lock(name, on_busy=on_lock_busy):  # two registers of one model never interleave
        return _promote_locked(client, cfg, name, model_uri, value, split_id, compare_on_unseen, tags,
                               run_files or {})


def _promote_locked(client, cfg: RegisterConfig, name: str, model_uri: str, value: float, split_id: str,
                    compare_on_unseen, tags: dict[str, str] | None,
                    run_files: dict[str, dict[str, Any]]) -> RegisterResult:
    champion = _current(client, name, cfg.alias)
    with into_log(__name__):  # MLflow prints what it registered; the summary says it
        mv = mlflow.register_model(model_uri, name)
    for path, content in run_files.items():
        client.log_dict(mv.run_id, content, path)
    tags = {**(tags or {}), "split_id": split_id, "run_id": mv.run_id or "",
            f"test_{cfg.metric}": f"{value:.6f}"}
    for key, val in tags.items():
        client.set_model_version_tag(mv.name, mv.version, key, val)
    result = RegisterResult(mv.name, str(mv.version), cfg.metric, value, None, None, True)
    if champion is not None:
        result = _against_champion(result, champion, cfg, split_id, compare_on_unseen)
    if result.promoted:
        client.set_registered_model_alias(mv.name, cfg.alias, mv.version)
        if champion is not None:
            client.set_model_version_tag(mv.name, mv.version, f"previous_{cfg.alias}",
                                         str(champion.version))
    client.set_model_version_tag(mv.name, mv.version, "promotion", result.summary())
    client.update_model_version(mv.name, mv.version, description=version_description(result, tags))
    log.info(result.summary())
    return result


def _against_champion(result: RegisterResult, champion, cfg: RegisterConfig, split_id: str,
                      compare_on_unseen) -> RegisterResult:
    """The champion rule: the new figure against the champion's, measured alike."""
    before = str(champion.version)
    tag = champion.tags.get(f"test_{cfg.metric}")
    if champion.tags.get("split_id") == split_id and tag is not None:
        value, champ_value, basis = result.value, float(tag), "the same test split"
    else:
        log.info("champion v%s was measured on another test split: comparing on the test "
                 "patients it did not train on", champion.version)
        try:
            value, champ_value, basis = compare_on_unseen(champion)
        except ComparisonRefused as exc:
            return dataclasses.replace(result, champion_before=before, promoted=False,
                                       basis="", refused=str(exc))
    promoted = is_better(cfg.metric, value, champ_value, cfg.margin)
    return dataclasses.replace(result, value=value, champion_before=before,
                               champion_value=champ_value, promoted=promoted, basis=basis)


def rollback(name: str, alias: str = "champion", to: str | None = None) -> tuple[str, str]:
    """Move ``alias`` back to the version it had before (or to version ``to``).

    Returns:
        (version it left, version it points to now)
    """
    client = mlflow.MlflowClient()
    current = _current(client, name, alias)
    if current is None:
        raise ValueError(f"registered model '{name}' has no alias '{alias}' to roll back: check the "
                         "name (the MLflow UI lists registered models) or run the register stage first")
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


def metrics_on_split(model_uri: str, data: PreparedData, split: str, positive_class: str | None,
                     groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a logged model on the original image files of a prepared split
    (only the cells of ``groups``, if given)."""
    from pipeline.metrics import (
        classification_metrics,  # sklearn: not for the scoring actors
    )

    rows = data.rows(split)
    if groups is not None:
        rows = rows[rows["patient_id"].astype(str).isin(set(groups))]
    images = [(data.images_dir / p).read_bytes() for p in rows["path"]]
    preds = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({INPUT_COLUMN: images}))
    classes = data.class_names
    labels = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    return classification_metrics(labels, probs, classes,
                                  positive_class if positive_class in classes else None)
