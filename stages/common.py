"""What every stage script shares: arguments, params.yaml loading, errors, process set-up."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Callable

import yaml

from pipeline.config import Params, read_params
from pipeline.console import header, stage_logging
from pipeline.utils import DEBUG_ENV, run_cli, set_quiet_env


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
        header(stage, doc, stage_logging(stage))  # inside run_cli: an unwritable logs/ is one line
        main(*(getattr(args, n) for n in names))

    run_cli(run)


def _dvc_yaml_args(stage: str) -> list[str]:
    """The arguments ``dvc.yaml`` gives ``stage`` (for ``--help``); none if it cannot say."""
    try:
        stages = yaml.safe_load((Path(__file__).resolve().parent.parent / "dvc.yaml").read_text())
        return str(stages["stages"][stage]["cmd"]).split()[2:]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []


PARAMS_FILE = Path("params.yaml")


def load_params(path: Path = PARAMS_FILE) -> Params:
    """All of ``params.yaml`` as typed config (:func:`pipeline.config.read_params`)."""
    set_quiet_env()
    return read_params(path)


def model_name(params: Params) -> str:
    """Registered model name: ``register.model_name`` or the dataset's name."""
    return params.register.model_name or params.dataset
