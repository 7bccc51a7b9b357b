"""Process set-up every entry point shares: telemetry off, and seeds set in one place."""

from __future__ import annotations

import os
import random

import numpy as np

# Telemetry and update checks are off unless the user already set these.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Logs for people (pipeline.console): MLflow logs through the root logger, not a handler of
    # its own; Ray Train workers print once (its print patch echoes every print twice).
    "MLFLOW_CONFIGURE_LOGGING": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Tune's boxed configuration table and TensorBoard hints: its legacy reporter at
    # verbose=0 prints nothing (trial outcomes are the pipeline's to report).
    "RAY_AIR_NEW_OUTPUT": "0",
}


def set_quiet_env() -> None:
    """Turn telemetry off for this process and every child it starts."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch in one place."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
