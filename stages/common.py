"""What every stage script shares: arguments, params.yaml loading, errors, process set-up.

A stage imports the library (torch, Ray, MLflow: seconds) inside ``main``, after
``load_params``: ``--help``, a wrong argument count and a bad param then answer at once."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from pipeline.cli import DEBUG_ENV, run_cli
from pipeline.console import header, stage_logging
from pipeline.env import set_quiet_env
from pipeline.files import write_json
from pipeline.params import Params, read_params


def run_stage(main: Callable[..., None], doc: str | None) -> None:
    """Parse the stage's positional arguments (named after ``main``'s parameters), then run
    it; ``--help`` prints the usage and touches nothing, a user mistake prints one line."""
    names = list(inspect.signature(main).parameters)
    parser = argparse.ArgumentParser(
        prog=f"python {sys.argv[0]}", description=doc,
        epilog=f"dvc repro runs this with the paths in dvc.yaml; params come from params.yaml in "
               f"the current folder. {DEBUG_ENV}=1 shows the traceback of an error.")
    stage = Path(sys.argv[0]).stem
    given = _dvc_yaml_args(stage)
    for i, name in enumerate(names):
        parser.add_argument(name, help=f"{name.replace('_', ' ')} path" +
                            (f" (dvc.yaml passes {given[i]})" if i < len(given) else ""))
    args = parser.parse_args()

    def run() -> None:
        log_file = stage_logging(stage)  # inside run_cli: an unwritable logs/ is one line
        header(stage, doc, log_file)
        with ResourceMonitor() as monitor:
            main(*(getattr(args, n) for n in names))
        write_json(log_file.with_suffix(".stats.json"), monitor.stats())

    run_cli(run)


class ResourceMonitor:
    """Wall time and peak resident memory of this process and every process under it (the
    local Ray instance a stage starts and its workers), sampled every 0.2 s."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ResourceMonitor":
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()

    def stats(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 2), "peak_rss_mb": round(self.peak / 2**20, 1)}


def _dvc_yaml_args(stage: str) -> list[str]:
    """The arguments ``dvc.yaml`` gives ``stage`` (for ``--help``); none if it cannot say."""
    try:
        stages = yaml.safe_load((Path(__file__).resolve().parent.parent / "dvc.yaml").read_text())
        return str(stages["stages"][stage]["cmd"]).split()[2:]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []


PARAMS_FILE = Path("params.yaml")


def load_params(path: Path = PARAMS_FILE) -> Params:
    """All of ``params.yaml`` as typed config (:func:`pipeline.params.read_params`)."""
    set_quiet_env()
    return read_params(path)


def model_name(params: Params) -> str:
    """Registered model name: ``register.model_name`` or the dataset's name."""
    return params.register.model_name or params.dataset
