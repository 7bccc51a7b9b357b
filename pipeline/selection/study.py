"""Model selection: cross-validate one or more configurations of the params as trials under
one MLflow parent run, and pool each configuration's out-of-fold predictions.

``pipeline crossval`` (and the ``crossval`` DVC stage) cross-validates the current params;
``pipeline sweep`` a grid of named overrides of them (``docs/model-selection.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.data.prepared import PreparedData
from pipeline.params import Params
from pipeline.selection import crossval
from pipeline.selection.trials import TrialOutcome, TrialSpec, run_trials, with_storage
from pipeline.tracking import dvc_experiment

SIZE_KEY = "prepare.image_size"  # a configuration with this key gets its own prepared folder
TTA_KEY = "evaluate.tta"  # an inference-only key: configurations that differ only here share trials


@dataclass(frozen=True)
class ConfigResult:
    """One configuration's cross-validation: pooled OOF figures, per-fold figures, wall time."""

    name: str
    overrides: dict[str, Any]
    params: Params
    oof: pd.DataFrame | None
    pooled: dict[str, float] = field(default_factory=dict)
    folds: pd.DataFrame | None = None
    wall_s: float = 0.0
    failed: list[str] = field(default_factory=list)
    parent_run_id: str = ""  # the MLflow run the trials are children of
    prepared: str = ""  # the prepared folder its trials learned from (its image size)


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """``params`` with dotted keys replaced (``train.lr: 3e-4``), checked like params.yaml."""
    raw = to_dict(params)
    for key, value in overrides.items():
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"sweep override {key}: no section {part} in params")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"sweep override {key}: unknown key {parts[-1]}")
        node[parts[-1]] = value
    return from_dict(Params, raw, where="sweep overrides")


def prepared_at(params: Params, prepared: Path, raw: Path | None, cache: Path) -> Path:
    """The prepared folder at ``params.prepare.image_size``: ``prepared`` itself, or one
    prepared from ``raw`` once into ``cache`` (same seed, so the same patients per split)."""
    if PreparedData(prepared).image_size == params.prepare.image_size:
        return prepared
    dest = cache / f"prepared_{params.prepare.image_size}px"
    if not (dest / "manifest.parquet").is_file():
        if raw is None:
            raise ConfigError(f"a configuration needs images at {params.prepare.image_size} px: "
                              "pass the raw archive (--raw data/raw/<dataset>.zip)")
        from pipeline.data.prepare import prepare

        prepare(raw, dest, params.prepare, params.dataset)
    same = PreparedData(dest).manifest.set_index("path")["split"].sort_index()
    if not same.equals(PreparedData(prepared).manifest.set_index("path")["split"].sort_index()):
        raise ConfigError(f"{dest} splits its images differently from {prepared}: delete it and "
                          "run again with the same prepare params")
    return dest


def read_exclude(path: str) -> frozenset[str]:
    """Manifest paths listed in a CSV's ``path`` column (empty path: none)."""
    if not path:
        return frozenset()
    table = pd.read_csv(path)
    if "path" not in table:
        raise ConfigError(f"crossval.exclude: {path} has no 'path' column")
    return frozenset(table["path"].astype(str))


def cross_validate(params: Params, configs: dict[str, dict[str, Any]], prepared: str | Path,
                   name: str, raw: str | Path | None = None, work_dir: str | Path = "crossval_work",
                   ) -> list[ConfigResult]:
    """Cross-validate every configuration (``{name: overrides}``) as Ray Tune trials.

    Every trial's training run is an MLflow child of one parent run named ``name``, which
    gets each configuration's pooled figures. Failed trials are listed in the result.
    """
    import mlflow

    from pipeline.tracking import setup_mlflow

    prepared, work = Path(prepared).resolve(), Path(work_dir).resolve()
    uri = setup_mlflow(params.dataset)
    resolved = {n: with_storage(with_overrides(params, ov), work / "checkpoints") for n, ov in configs.items()}
    specs, trial_of = _specs(resolved, configs, prepared, Path(raw) if raw else None, work)
    with mlflow.start_run(run_name=name, description=_description(params, configs)) as parent:
        mlflow.log_params({"crossval.folds": params.crossval.folds, "crossval.seed": params.crossval.seed,
                           "configurations": ",".join(configs)})
        outcomes = run_trials(specs, name, work / "tune", parent.info.run_id,
                              _cpus_per_trial(params), uri)
        results = [replace(_collect(n, configs[n], resolved[n], [outcomes[i] for i in trial_of[n]]),
                           parent_run_id=parent.info.run_id) for n in configs]
        for r in results:
            mlflow.log_metrics({f"{r.name}.{k}": v for k, v in r.pooled.items()
                                if isinstance(v, float) and v == v})
        if any(r.failed for r in results):
            mlflow.set_tag("failed_trials", "; ".join(f for r in results for f in r.failed)[:4000])
    return results


def _cpus_per_trial(params: Params) -> float:
    """CPUs one trial's trainer holds; ``train.num_workers: auto`` fills the cluster (one at a time)."""
    if params.train.num_workers == "auto":
        return float("inf")
    return params.train.num_workers * params.train.cpus_per_worker


def _specs(resolved: dict[str, Params], configs: dict[str, dict[str, Any]], prepared: Path,
           raw: Path | None, work: Path) -> tuple[list[TrialSpec], dict[str, list[int]]]:
    """One trial per (training configuration, fold); configurations that differ only in
    ``evaluate.tta`` share one training and get both predictions."""
    groups: dict[str, list[str]] = {}
    for n, ov in configs.items():
        key = repr(sorted((k, v) for k, v in ov.items() if k != TTA_KEY))
        groups.setdefault(key, []).append(n)
    specs, trial_of = [], {}
    for members in groups.values():
        p = resolved[members[0]]
        tta = tuple(sorted({resolved[m].evaluate.tta for m in members}))
        # The prepared folder is the data unless a configuration asks for another image size.
        data = prepared_at(p, prepared, raw, work) if SIZE_KEY in configs[members[0]] else prepared
        for f in range(p.crossval.folds):
            spec = TrialSpec(members[0], f, replace(p, evaluate=replace(p.evaluate, tta=False)),
                             str(data), p.crossval.folds,
                             p.crossval.seed, tta, read_exclude(p.crossval.exclude))
            for m in members:
                trial_of.setdefault(m, []).append(len(specs))
            specs.append(spec)
    return specs, trial_of


def _collect(name: str, overrides: dict[str, Any], params: Params,
             outcomes: list[TrialOutcome]) -> ConfigResult:
    """Pool one configuration's OOF rows (its TTA variant's) and compute its figures."""
    failed = [f"{name} fold {o.spec.fold}: {o.error}" for o in outcomes if not o.ok]
    wall, data = sum(o.wall_s for o in outcomes), outcomes[0].spec.prepared
    if failed:
        return ConfigResult(name, overrides, params, None, wall_s=wall, failed=failed, prepared=data)
    oof = pd.concat([o.oof[o.oof["tta"] == params.evaluate.tta] for o in outcomes], ignore_index=True)
    if not np.isfinite(oof["p_pos"]).all():
        return ConfigResult(name, overrides, params, None, wall_s=wall, prepared=data,
                            failed=[f"{name}: non-finite out-of-fold probabilities"])
    ev = params.evaluate
    pooled = crossval.pooled(oof, ev.positive_class, ev.patient_threshold, ev.bootstrap, ev.ci_level)
    return ConfigResult(name, overrides, params, oof, pooled, crossval.per_fold(oof, ev.positive_class), wall,
                        prepared=data)


def _description(params: Params, configs: dict[str, dict[str, Any]]) -> str:
    experiment = dvc_experiment()
    listed = "; ".join(f"{n}: {ov or 'the params as they are'}" for n, ov in configs.items())
    return (f"{params.crossval.folds}-fold patient-grouped cross-validation (fold seed "
            f"{params.crossval.seed}) over the training and validation patients, from {experiment}. "
            f"Configurations: {listed}. Each child run trains one fold.")
