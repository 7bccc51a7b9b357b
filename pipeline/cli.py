"""The command-line error policy: a user mistake is one ``error:`` line, a bug keeps its
traceback."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any, Callable

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


def command_line(prefix: str, argv: list[str]) -> str:
    """The command as a page shows it: absolute paths by their file name only, so a generated
    page names no folder of the machine it ran on."""
    return " ".join([prefix, *(f"<{Path(a).name}>" if Path(a).is_absolute() else a for a in argv)])
