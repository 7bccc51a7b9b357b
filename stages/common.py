"""What every stage script shares: params.yaml loading and process set-up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, Params, from_dict
from pipeline.utils import set_quiet_env, setup_logging

PARAMS_FILE = Path("params.yaml")


def load_params(path: Path = PARAMS_FILE) -> Params:
    """All of ``params.yaml`` as typed config; exits with the error on a bad key."""
    set_quiet_env()
    setup_logging()
    logging.getLogger("pipeline").setLevel(logging.INFO)
    raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    try:
        return from_dict(Params, raw, where=str(path))
    except ConfigError as exc:
        raise SystemExit(f"error in {path}: {exc}") from None


def model_name(params: Params) -> str:
    """Registered model name: ``register.model_name`` or the dataset's name."""
    return params.register.model_name or params.dataset
