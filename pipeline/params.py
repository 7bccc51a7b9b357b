"""``params.yaml`` as a whole: every section's typed config (:mod:`pipeline.config`) in one
:class:`Params`, the checks that span sections, and :func:`read_params` for entry points."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import (
    AugmentConfig,
    ConfigError,
    CrossvalConfig,
    DownloadConfig,
    EvaluateConfig,
    PrepareConfig,
    RegisterConfig,
    ScoreConfig,
    TrainConfig,
    ValidateConfig,
    from_dict,
)


@dataclass(frozen=True)
class Params:
    """Every section of ``params.yaml``."""

    dataset: str = "malaria"
    download: DownloadConfig = field(default_factory=DownloadConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    crossval: CrossvalConfig = field(default_factory=CrossvalConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    def __post_init__(self) -> None:
        # Every dataset of pipeline/data/datasets.py has a source: this refuses an unknown name too
        if self.dataset not in self.download.sources:
            raise ConfigError(f"dataset: no download.sources.{self.dataset} in params.yaml; datasets "
                              f"with a source: {', '.join(sorted(self.download.sources))} (a new one "
                              "needs an entry in pipeline/data/datasets.py and its source)")


def read_params(path: Path) -> Params:
    """Every section of a ``params.yaml`` as typed config (for entry points, not the library).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: a bad key or value, named.
    """
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in {Path.cwd()}: run from the project root "
                                "(dvc repro does)")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return from_dict(Params, raw, where=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
