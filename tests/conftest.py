"""Shared fixtures: synthetic archives, the real sample, an isolated MLflow store, Ray."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pipeline.env import set_quiet_env

set_quiet_env()
# Ray Train's controller polls its workers every 2 s, so a fit ends up to 2 s after its workers
# do; the suite runs about 20 small fits. Polled every 0.5 s instead (a
# missed poll is not a failure: a worker is dead only after 10 minutes without an answer).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

REPO = Path(__file__).resolve().parent.parent
# The real NIH data beyond the fixture: the 32-patient sample and the 84-patient external pool,
# wherever MALARIA_SAMPLE / MALARIA_POOL point (.ci/run points them at the project's copies).
# Tests that need them carry the `sample` mark and do not run without them.
SAMPLE_ENV, POOL_ENV = "MALARIA_SAMPLE", "MALARIA_POOL"
SAMPLE_SHA256 = "e126241df6db48ee5e710370ef90aba547d10411c89d024a6e392f15be590163"
# A few hundred real cells of 12 sample patients, committed (tests/fixtures/README.md).
CELLS_SMALL = REPO / "tests" / "fixtures" / "cells_small.zip"
CELLS_SMALL_SHA256 = "1b5fa8d5c5b83848d5f2bc9e483dfdb68a84b563a2f568776d259a6726194674"
HOW_TO_GET_THE_SAMPLE = (
    f"set {SAMPLE_ENV} (and {POOL_ENV}) to the zip's path; build them from the official "
    "cell_images.zip with `pipeline sample cell_images.zip sample.zip` (and `--subset pool`)")


def real_data(env: str) -> Path | None:
    """The zip ``env`` points at, or None when unset or missing."""
    path = os.environ.get(env)
    return Path(path).resolve() if path and Path(path).is_file() else None


def pytest_collection_modifyitems(config, items) -> None:
    """Without the real sample, `sample` tests are skipped (never passed), and counted. Under
    pytest-xdist, modules with the most `slow` tests go first (see :func:`_heavy_modules_first`)."""
    if hasattr(config, "workerinput"):
        _heavy_modules_first(items)
    missing = [env for env in (SAMPLE_ENV, POOL_ENV) if real_data(env) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"{' and '.join(missing)} not set: {HOW_TO_GET_THE_SAMPLE}")
    for item in items:
        mark = item.get_closest_marker("sample")
        if mark and set(missing) & set(mark.args or (SAMPLE_ENV,)):
            item.add_marker(skip)


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test`: two processes on two cores), this process's own torch
    work runs on one thread. With two, a barrier waits for a thread the other process has
    pushed off its core: the GPU bench smoke test took 13-15 s alone, 98 s beside another test
    in CI and 572 s beside a training run. Subprocesses (stages, Ray workers) set their own threads."""
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)


def _heavy_modules_first(items: list) -> None:
    """`make test` hands whole modules to its two pytest processes (``--dist loadscope``: a
    module's fixtures, such as the demo project or a Ray instance, are built once), in the
    order collected. Modules with more `slow` tests go first, so that a long module does not
    start last while the other process sits idle. A stable sort: every process sees one order."""
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    slow = Counter(module(item) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[module(item)])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # Counted from the skip reports, not at collection: with pytest-xdist the workers collect.
    not_run = sum(HOW_TO_GET_THE_SAMPLE in str(report.longrepr)
                  for report in terminalreporter.stats.get("skipped", []))
    if not_run:
        terminalreporter.write_line(f"{not_run} tests of the real NIH sample did not run: "
                                    f"{HOW_TO_GET_THE_SAMPLE}", yellow=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening on ``host`` (a loopback address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    """Poll ``check`` until it returns true; connection errors count as not yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def repo_params(**change) -> dict:
    """The repository's ``params.yaml`` as a dict, with ``change`` merged in section by section."""
    import yaml

    from pipeline.project import deep_update

    return deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), change)


def has_committed_checkpoint(storage: Path) -> bool:
    """Whether a Ray Train run under ``storage`` has committed a checkpoint: listed in its
    checkpoint manager's snapshot, which is what a restarted run resumes from. (A
    ``checkpoint_*`` folder appears before it is committed; a driver killed in between
    resumes from the checkpoint before it.)"""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if "checkpoint_" in snapshot.read_text():
                return True
        except OSError:  # replaced while we looked
            pass
    return False


def own_ray_processes(title: str) -> list:
    """Processes under this test process whose title names ``title`` (a Ray worker or actor
    shows its class there, as ``ray::RayTrainWorker``): those of its own Ray instance, never
    another pytest process's beside it."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()[:1]):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    return found


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a process in its own process group (so it can be stopped with everything it spawned)."""
    from pipeline.project import dvc_env

    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env=env or dvc_env(), start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a process started by :func:`start`, and its children: SIGTERM, then SIGKILL after
    ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_mlflow_server(backend: str, root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """An MLflow tracking server on 127.0.0.1:``port`` over ``backend``, artifacts under ``root``."""
    from pipeline.project import dvc_env

    env = {**dvc_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
                  "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                 root / "mlflow.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 120,
                 "MLflow server")
    except TimeoutError:
        stop(proc)
        raise
    return proc, url


def check_champion_on_server(server: str, monkeypatch) -> None:
    """The tracking server at ``server`` has ``malaria@champion``, its run has the
    training and test metrics, and the model loads through pyfunc and predicts."""
    import mlflow
    import numpy as np
    import pandas as pd

    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: undo both afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(server)
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias("malaria", "champion")
        run = client.get_run(champion.run_id)
        assert {"train_loss", "val_loss", "test_accuracy"} <= set(run.data.metrics)
        model = mlflow.pyfunc.load_model("models:/malaria@champion")
        import zipfile

        from pipeline.data.synthetic import png_bytes

        with zipfile.ZipFile(CELLS_SMALL) as zf:  # a real cell, then an image of nothing
            cell = zf.read(sorted(n for n in zf.namelist() if n.endswith(".png"))[0])
        blank = png_bytes(np.full((50, 60, 3), 200, np.uint8))
        preds = model.predict(pd.DataFrame({"image": [cell, blank]}))
        assert preds["status"].tolist() == ["ok", "rejected"]
        assert preds["predicted_label"].iloc[0] in {"Parasitized", "Uninfected"}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def sample_zip() -> Path:
    """The real 32-patient NIH sample (``MALARIA_SAMPLE``); only `sample` tests ask for it."""
    path = real_data(SAMPLE_ENV)
    if path is None:  # a test without the mark asked for it: that is a bug of the test
        pytest.fail(f"{SAMPLE_ENV} not set, and this test lacks the `sample` mark")
    return path


@pytest.fixture(scope="session")
def pool_zip() -> Path:
    """The real 84-patient external pool (``MALARIA_POOL``); only `sample` tests ask for it."""
    path = real_data(POOL_ENV)
    if path is None:
        pytest.fail(f"{POOL_ENV} not set, and this test lacks the `sample(\"{POOL_ENV}\")` mark")
    return path


@pytest.fixture(scope="session")
def cells_small() -> Path:
    """235 real cells of 12 sample patients, committed with the tests."""
    return CELLS_SMALL


@pytest.fixture(scope="session")
def synthetic_zip(tmp_path_factory) -> Path:
    """A small synthetic archive with Thumbs.db files and two corrupt PNGs."""
    from pipeline.data.synthetic import make_archive

    return make_archive(tmp_path_factory.mktemp("synth") / "cells.zip", n_patients=10,
                        cells_per_patient=16, seed=1, corrupt=2)


@pytest.fixture(scope="session")
def prepared_synthetic(synthetic_zip, tmp_path_factory) -> Path:
    """The synthetic archive run through ``prepare`` at a tiny image size."""
    return prepared(synthetic_zip, tmp_path_factory.mktemp("prepared"), 32)


def prepared(archive: Path, folder: Path, size: int) -> Path:
    """``archive`` through ``prepare`` at ``size`` px into ``folder/prepared``."""
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare

    prepare(archive, folder / "prepared", PrepareConfig(image_size=size), "malaria")
    return folder / "prepared"


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A private sqlite MLflow store for the whole session (artifacts beside it)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="module", autouse=True)
def _mlflow_state_stays_in_its_module():
    """A module leaves MLflow's process-wide state as it found it: the tracking URI (a global,
    which ``mlflow.set_tracking_uri`` also exports as MLFLOW_TRACKING_URI) and the active
    experiment (a global and MLFLOW_EXPERIMENT_ID). A later module's store or subprocess
    would otherwise be one this module pointed at."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    env = os.environ.get("MLFLOW_TRACKING_URI")  # None until the session's store is made
    uri = mlflow.get_tracking_uri() if env else None
    yield
    if env is not None:
        mlflow.set_tracking_uri(uri)
        os.environ["MLFLOW_TRACKING_URI"] = env
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance on loopback for one test module, shut down (only it) after it.

    Per module, not per session: a test that starts Ray in a subprocess (the demo, the
    stages) would otherwise find two local instances, and Ray Train's placement-group
    cleaner, which looks its cluster up by address, prints a traceback about them."""
    import ray

    from pipeline.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An (untrained) small model checkpoint in the format ``train`` writes."""
    from pipeline.models import create_model, model_info
    from pipeline.serving.inference import ModelMeta, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    info = model_info("baseline_cnn")
    meta = ModelMeta("baseline_cnn", ("Parasitized", "Uninfected"), 32, info.mean, info.std)
    save_checkpoint(path, create_model("baseline_cnn", 2, pretrained=False), meta)
    return path


@pytest.fixture(scope="session")
def model_uris(tracking_uri, checkpoint):
    """Factory: log the checkpoint as a new pyfunc model in its own run; return its URI."""
    import mlflow
    import numpy as np

    from pipeline.data.synthetic import synthetic_cell
    from pipeline.serving.pyfunc import log_model

    mlflow.set_experiment("tests")
    example = synthetic_cell(np.random.default_rng(0), True, 40)

    def log() -> str:
        with mlflow.start_run():
            return log_model(checkpoint, example, ("Parasitized", "Uninfected"))

    return log


@pytest.fixture(scope="session")
def prepared_cells(cells_small, tmp_path_factory) -> Path:
    """The committed real cells run through ``prepare`` at 64 px."""
    return prepared(cells_small, tmp_path_factory.mktemp("prepared-cells"), 64)


@pytest.fixture(scope="session")
def reject_checkpoint(prepared_cells, tmp_path_factory) -> Path:
    """A checkpoint with the reject option, as ``train`` writes it: the pretrained backbone (its
    features are what the OOD score reads) fitted on the real cells' training split."""
    from pipeline.data.prepared import PreparedData
    from pipeline.models import create_model, model_info
    from pipeline.serving.inference import (
        ModelMeta,
        attach_reject_option,
        save_checkpoint,
    )
    from pipeline.serving.screening import InputLimits

    data = PreparedData(prepared_cells)
    info = model_info("efficientnet_lite0")
    meta = ModelMeta("efficientnet_lite0", tuple(data.class_names), data.image_size, info.mean, info.std)
    path = tmp_path_factory.mktemp("reject-ckpt") / "model.pt"
    save_checkpoint(path, create_model("efficientnet_lite0", 2, pretrained=True), meta)
    rows, train = data.rows("train"), data.split("train")
    attach_reject_option(path, train.images, train.labels, data.split("val").images,
                         InputLimits.of(rows["width"].to_numpy(), rows["height"].to_numpy()))
    return path
