"""The JSON files one stage hands to the next, with a typed reader for each.

``train`` writes ``models/train.json`` (:class:`TrainHandoff`), read by
``evaluate`` and ``register``; ``register`` writes ``models/register.json``
(:class:`RegisterHandoff`), read by ``score``. A missing or unknown key is an
error that names the file, never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipeline.config import ConfigError, from_dict
from pipeline.files import write_json

H = TypeVar("H")


@dataclass(frozen=True)
class TrainHandoff:
    """What ``train`` produced: its MLflow run and the logged model."""

    run_id: str
    model_uri: str


@dataclass(frozen=True)
class RegisterHandoff:
    """What ``register`` decided: the new version and whether the alias moved to it."""

    name: str
    version: str
    alias: str
    metric: str
    value: float
    champion_before: str | None
    champion_value: float | None
    promoted: bool
    basis: str  # what both figures were measured on
    refused: str | None  # why there was no fair comparison, if there was none
    summary: str

    def alias_uri(self) -> str:
        """``models:/<name>@<alias>``: the champion, wherever the alias points now."""
        return f"models:/{self.name}@{self.alias}"


def write_handoff(handoff: object, path: str | Path) -> None:
    """Write a hand-off dataclass as JSON, atomically."""
    write_json(path, dataclasses.asdict(handoff))


def read_handoff(cls: type[H], path: str | Path) -> H:
    """Read hand-off ``cls`` from ``path``; a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    try:
        return from_dict(cls, json.loads(path.read_text()), where=str(path))
    except (ConfigError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a valid {cls.__name__} file: {exc}") from None
