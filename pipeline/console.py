"""What a person sees in the terminal, and where the full detail goes instead.

The console gets each stage's header, progress bars, a short summary and where the
outputs went, plus warnings and errors a user can act on. Everything else every
library logs (MLflow, Ray, Alembic, Python warnings) goes, with timestamps, to
``logs/<stage>.log`` in the project. This module is the one place that decides.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

LOG_DIR = Path("logs")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(processName)s: %(message)s"
OWN = "pipeline"  # this project's loggers: their warnings are meant for the user


class _ForPeople(logging.Filter):
    """Warnings of this project (written for the user) and errors of anything."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return record.levelno >= logging.ERROR or (own and record.levelno >= logging.WARNING)


def stage_logging(stage: str, log_dir: Path = LOG_DIR) -> Path:
    """Send every logger's records to ``log_dir/<stage>.log`` and only those meant for people
    to the console; return the log file's path."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{stage}.log"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    to_file = logging.FileHandler(path, mode="w", encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ForPeople())
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(to_file)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings to the file, through "py.warnings"
    logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's schema check, each connection
    adopt_library_loggers()
    return path


def adopt_library_loggers() -> None:
    """Libraries that print through handlers of their own (MLflow, Ray) send their records
    through the root logger instead; called again after a library is imported late."""
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if name.split(".")[0] in ("mlflow", "ray", "alembic", "urllib3", "filelock"):
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
            logger.propagate = True
            if logging.NOTSET < logger.level < logging.INFO:  # Ray Data logs DEBUG by default
                logger.setLevel(logging.INFO)


@contextlib.contextmanager
def into_log(name: str) -> Iterator[None]:
    """What a library prints (rather than logs) inside the block goes to the log file as
    ``name``'s INFO records (MLflow's "Successfully registered model", for one)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logging.getLogger(name).info(line)


def quiet_worker() -> None:
    """In a Ray worker (whose root logger prints INFO): the database set-up MLflow's
    store logs on every connection stays out of the console."""
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_trial() -> None:
    """In a Ray Tune trial: its checkpoint notices and MLflow's set-up stay out of the console."""
    quiet_worker()
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any):
    """A tqdm progress bar; when the output is not a terminal (CI, a log file), plain ASCII
    and an update every 30 s rather than a stream of redrawn lines."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs = {"ascii": True, "mininterval": 30.0, **kwargs}
    return tqdm(iterable, **kwargs)


def header(stage: str, doc: str | None, log_path: Path) -> None:
    """The first console line of a stage: its name, what it does, where its details go."""
    what = (doc or "").strip().splitlines()[0] if doc else ""
    what = (what.split(":", 1)[1] if ":" in what else what).strip().rstrip(".")
    print(f"\n== {stage}: {what} (details: {log_path})", flush=True)


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train logs each report (metrics and checkpoint path) at
    INFO from a logger named after its source file, which ``LoggingConfig`` does not reach;
    rank 0 prints :func:`epoch_line` instead. MLflow stays quiet too (:func:`quiet_worker`)."""
    quiet_worker()
    try:  # a private module: if Ray moves it, the reports are merely verbose again
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_line(metrics: dict[str, float], epochs: int) -> str:
    """One console line for one epoch (rank 0 prints it)."""
    return (f"epoch {metrics['epoch']}/{epochs}: train loss {metrics['train_loss']:.4f} acc "
            f"{metrics['train_acc']:.4f} | val loss {metrics['val_loss']:.4f} acc "
            f"{metrics['val_acc']:.4f} | {metrics['images_per_s']:.0f} img/s, "
            f"{metrics['epoch_time_s']:.1f} s")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain, timestamped log lines for the CLIs and stages."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
