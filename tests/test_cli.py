"""The command line as a user meets it: every stage script and `pipeline` answer --help and
touch nothing, a wrong argument count is a usage error, a user mistake is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, repo_params

STAGES = ["download", "prepare", "augment", "train", "evaluate", "register", "score"]
ARGS = {"download": 1, "prepare": 3, "augment": 3, "train": 6, "evaluate": 5, "register": 4, "score": 3}


def run(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **env}
    full_env.pop("PIPELINE_DEBUG", None) if "PIPELINE_DEBUG" not in env else None
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def stage(name: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / f"{name}.py")]


def pipeline_cli() -> list[str]:
    return [sys.executable, "-m", "pipeline"]


@pytest.mark.parametrize("command", [*STAGES, "pipeline"])
def test_help_prints_usage_and_touches_nothing(command, tmp_path):
    argv = pipeline_cli() if command == "pipeline" else stage(command)
    proc = run([*argv, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", STAGES)
def test_wrong_argument_count_is_a_usage_error(name, tmp_path):
    proc = run([*stage(name), *["x"] * (ARGS[name] + 1)], tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _params(tmp_path, **change) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params(**change)))


MISTAKES = {
    "no params.yaml here": (lambda t: None, stage("evaluate") + ["m", "p", "x.json", "plots", "r.md"],
                            "params.yaml not found"),
    "a bad param value": (lambda t: _params(t, train={"regime": "finetune"}),
                          stage("train") + ["p", "a.yaml", "m", "x.json", "h.csv", "c.png"],
                          "train.regime: 'finetune' is not one of"),
    "an unknown param key": (lambda t: _params(t, train={"epoch": 3}),
                             stage("train") + ["p", "a.yaml", "m", "x.json", "h.csv", "c.png"], "unknown key"),
    "an unknown dataset": (lambda t: _params(t, dataset="mnist"), stage("prepare") + ["a.zip", "o", "c.md"],
                           "dataset: no download.sources.mnist"),
    "a missing archive": (lambda t: _params(t), stage("prepare") + ["gone.zip", "o", "c.md"],
                          "run the download stage first"),
    "a missing hand-off": (lambda t: _params(t), stage("evaluate") + ["m", "p", "x.json", "plots", "r.md"],
                           "run the stage that writes it first"),
    "score: missing input": (lambda t: None, pipeline_cli() + ["score", "--model", "models:/m@champion",
                             "--input", "nowhere", "--output", "o.parquet"], "score input nowhere does not exist"),
    "score: no champion": (lambda t: (t / "cells").mkdir(), pipeline_cli() + [
        "score", "--model", "models:/nope@champion", "--input", "cells", "--output", "o.parquet"],
        "Run the register stage first"),
    "rollback: no champion": (lambda t: None, pipeline_cli() + ["rollback", "--name", "nope"],
                              "has no alias 'champion' to roll back"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_user_mistake_is_one_line_that_says_what_to_do(case, tmp_path):
    setup, argv, message = MISTAKES[case]
    setup(tmp_path)
    proc = run(argv, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert message in lines[-1]


def test_the_traceback_is_there_on_request(tmp_path):
    proc = run(pipeline_cli() + ["rollback", "--name", "nope"], tmp_path, PIPELINE_DEBUG="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError" in proc.stderr


def test_version():
    proc = subprocess.run(pipeline_cli() + ["--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("pipeline ")


def test_a_full_disk_while_writing_a_stage_output_leaves_no_partial_output(tmp_path, synthetic_zip):
    """RLIMIT_FSIZE stands in for a full disk without root: writes past it fail with EFBIG."""
    import resource
    import signal

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    _params(tmp_path, prepare={"image_size": 32})
    (tmp_path / "data").mkdir()
    argv = stage("prepare") + [str(synthetic_zip), "data/prepared", "reports/data_card.md"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk, env={**os.environ, "PIPELINE_DEBUG": ""})
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: no room to write the output") and "train.npy" in last
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path / "reports").exists()
