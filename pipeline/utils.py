"""Small shared helpers: quiet defaults, seeding, atomic file writes, logging."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import secrets
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

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


def setup_logging(level: int = logging.INFO) -> None:
    """Plain, timestamped log lines for the CLIs and stages."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` on success.

    A stage that fails half-way leaves no partial output that DVC could cache.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 would ignore the umask, and on a shared filesystem
    # nobody else could read the output. 0666 & ~umask, like any other file.
    while True:
        tmp_path = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local Ray on loopback.

    A local instance advertises 127.0.0.2 (with 127.0.0.1 Ray swaps in the machine's
    external address) and its dashboard stays on loopback; Ray's own gRPC servers
    still listen on every interface, behind its token authentication
    (docs/reliability.md).
    """
    set_quiet_env()
    if not sys.stdout.isatty():  # Ray colours worker prefixes even in a file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    local = not os.environ.get("RAY_ADDRESS")
    if local and "ray" not in sys.modules:  # Ray reads these when it is imported
        # Token authentication stays on. Naming the mode skips Ray's notice about it; a token
        # made for this instance (its processes inherit it) keeps Ray from writing ~/.ray.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    from pipeline.console import adopt_library_loggers

    if ray.is_initialized():
        return
    if local:
        ray.init(_node_ip_address=os.environ.get("PIPELINE_RAY_NODE_IP", "127.0.0.2"),
                 num_cpus=num_cpus, logging_level=logging.WARNING)
    else:
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
    adopt_library_loggers()


DEBUG_ENV = "PIPELINE_DEBUG"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a mistake the user fixes (a path, a param, an argument, a missing
    model) rather than a bug: those get one line, bugs keep their traceback."""
    from pipeline.config import UserError

    mlflow_errors = sys.modules.get("mlflow.exceptions")
    return (isinstance(exc, (UserError, FileNotFoundError, PermissionError, IsADirectoryError,
                             ValueError))
            or (isinstance(exc, OSError) and exc.errno in DISK_FULL)
            or (mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException)))


def run_cli(func: Callable[[], Any]) -> Any:
    """Run a command-line entry point: a user mistake prints one ``error:`` line and exits 1
    (the traceback only with ``PIPELINE_DEBUG=1``); anything else propagates."""
    try:
        return func()
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) or not is_user_error(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            message = (f"no room to write the output ({message}); nothing half-written was kept: "
                       "free disk space (or raise the file-size limit) and run again")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
