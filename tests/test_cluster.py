"""A real cluster on loopback: PostgreSQL-backed MLflow server + a 2-node Ray cluster,
and the pipeline (`dvc repro`: train, evaluate, register, score) submitted with `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.project import dvc_env, scaffold
from tests.conftest import (
    CELLS_SMALL_SHA256,
    check_champion_on_server,
    free_port,
    start,
    start_mlflow_server,
    stop,
    wait_for,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture()
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 (initdb as the postgres user)."""
    import tempfile

    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed: apt-get install postgresql")
    if os.geteuid() != 0:
        pytest.skip("needs root to run PostgreSQL as the postgres user (runuser)")
    data = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # pytest's tmp dirs are root-only
    shutil.chown(data, "postgres")
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run(run + ["initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = free_port()
    subprocess.run(run + ["pg_ctl", "-D", str(data), "-l", str(data / "log"), "-w", "start", "-o",
                          f"-p {port} -k {data} -c listen_addresses=127.0.0.1"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run + ["pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture()
def mlflow_server(postgres, tmp_path):
    proc, url = start_mlflow_server(postgres, tmp_path, free_port())
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture()
def ray_cluster(tmp_path, monkeypatch):
    """Head on 127.0.0.2 and a worker node on 127.0.0.3, one CPU each."""
    import tempfile

    gcs, dash = free_port("127.0.0.2"), free_port("127.0.0.2")
    ray_tmp = tempfile.mkdtemp(prefix="rt-")  # Ray's socket paths must stay under 107 bytes
    # Token auth off for this throw-away loopback cluster; keep it on for real ones.
    env = {**dvc_env(), "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    head = start([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.2",
                  f"--port={gcs}", "--dashboard-host=127.0.0.2", f"--dashboard-port={dash}",
                  "--num-cpus=1", f"--ray-client-server-port={free_port('127.0.0.2')}",
                  # its own agent port: the default 52365 of another local instance (a pipeline
                  # run beside the tests) would leave this head without an agent to submit to
                  f"--dashboard-agent-listen-port={free_port('127.0.0.2')}",
                  "--min-worker-port=21000", "--max-worker-port=21999"],
                 tmp_path / "head.log", env)
    procs = [head]
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.2:{dash}/", timeout=2).status == 200,
                 120, "Ray head")
        procs.append(start([str(BIN / "ray"), "start", "--block", f"--address=127.0.0.2:{gcs}",
                            "--node-ip-address=127.0.0.3", "--num-cpus=1",
                            f"--temp-dir={ray_tmp}/worker",  # its own runtime_resources
                            f"--dashboard-agent-listen-port={free_port('127.0.0.3')}",
                            "--min-worker-port=22000", "--max-worker-port=22999"],
                           tmp_path / "worker.log", env))

        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for the state API client in this process

        def two_nodes() -> bool:
            from ray.util.state import list_nodes

            nodes = list_nodes(address=f"http://127.0.0.2:{dash}", raise_on_missing_output=False)
            return sum(n.state == "ALIVE" for n in nodes) == 2

        wait_for(two_nodes, 120, "two Ray nodes")
        yield {"dashboard": f"http://127.0.0.2:{dash}", "gcs": f"127.0.0.2:{gcs}", "env": env}
    finally:
        for proc in reversed(procs):
            # a throw-away node: its graceful shutdown outlasted 30 s (the whole teardown was
            # 31.6 s of the test's 105 s), and nothing of it is kept
            stop(proc, grace=3)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_trains_on_two_nodes_into_postgres_mlflow(
        cells_small, tmp_path, mlflow_server, ray_cluster, monkeypatch):
    from ray.util.state import list_actors

    project = scaffold(tmp_path / "project", {
        "download": {"sources": {"malaria": {"url": str(cells_small), "sha256": CELLS_SMALL_SHA256}}},
        "prepare": {"image_size": 32},
        "train": {"epochs": 1, "batch_size": 32, "num_workers": 2, "cpus_per_worker": 1.0,
                  "storage_path": str(tmp_path / "shared-checkpoints")},
        "evaluate": {"bootstrap": 50, "gradcam_images": 2, "tta": False},  # one view: 8x less
        "score": {"tta": False},                                             # inference
    })
    env = {**ray_cluster["env"], "MLFLOW_TRACKING_URI": mlflow_server}
    # As the README says: the driver runs `dvc repro` in the project on the filesystem
    # every node shares (here: this host), so DVC's outputs land in the project.
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
         "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}}),
         "--", "bash", "-c", f"cd {project} && dvc repro"],
        capture_output=True, text=True, env=env, timeout=900)
    (tmp_path / "job.log").write_text(job.stdout + job.stderr)
    errors = [line for line in job.stdout.splitlines() if "Error" in line or "error" in line]
    assert job.returncode == 0, "\n".join(errors[-30:]) or job.stdout[-4000:]
    assert "is the first model: alias set" in job.stdout
    assert json.loads((project / "models/register.json").read_text())["promoted"]
    assert (project / "dvc.lock").is_file() and (project / "data/scores/predictions.parquet").is_file()

    workers = list_actors(address=ray_cluster["dashboard"], filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, limit=100)
    assert len({a.node_id for a in workers}) == 2, workers  # one worker per node

    check_champion_on_server(mlflow_server, monkeypatch)

