"""Security, as written in docs/reliability.md: safe deserialisation only, loopback by default,
and secrets that never reach MLflow or a log."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import yaml

from tests.conftest import REPO, repo_params

SOURCES = sorted((REPO / "pipeline").rglob("*.py")) + sorted((REPO / "stages").glob("*.py"))


def _calls(name: str):
    """(file, call node) of every call to dotted ``name`` in the package and stage scripts."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path, node


def test_torch_load_always_with_weights_only():
    calls = list(_calls("torch.load"))
    assert calls, "the scan found no torch.load at all: is it still looking in the right place?"
    for path, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, \
            f"{path.name}:{node.lineno} torch.load without weights_only=True"


def test_no_pickle_of_user_data():
    unsafe = ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "pd.read_pickle",
              "joblib.load", "dill.load")
    for name in unsafe:
        assert not list(_calls(name)), f"{name} would run code hidden in a user's file"
    for path, node in _calls("np.load"):
        kw = {k.arg: k.value for k in node.keywords}
        assert "allow_pickle" not in kw or ast.literal_eval(kw["allow_pickle"]) is False, \
            f"{path.name}:{node.lineno} np.load with allow_pickle"


def test_compose_publishes_only_on_loopback():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    published = [(name, str(port)) for name, service in compose["services"].items()
                 for port in service.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for _, port in published), published


def test_the_local_ray_instance_advertises_loopback_and_its_dashboard_listens_there(ray_local):
    """Ray 2.60's own gRPC servers (GCS, raylet, workers) listen on every interface whatever
    the node address; token authentication guards them (docs/reliability.md says so)."""
    import psutil

    assert {n["NodeManagerAddress"] for n in ray_local.nodes()} == {"127.0.0.2"}
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    port = int(ray_local._private.worker.get_dashboard_url().rsplit(":", 1)[1])
    dashboard = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours and c.laddr.port == port]
    assert dashboard and set(dashboard) <= {"127.0.0.1", "127.0.0.2"}, dashboard
    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"


SENTINELS = {"POSTGRES_PASSWORD": "sentinel-pw-4f1c9", "AWS_SECRET_ACCESS_KEY": "sentinel-key-77ab2",
             "MLFLOW_TRACKING_TOKEN": "sentinel-token-91d0e", "RAY_AUTH_TOKEN": "sentinel-ray-3b8e1"}


def test_secrets_in_the_environment_reach_no_param_tag_artifact_or_log(prepared_synthetic, checkpoint,
                                                                       model_uris, tmp_path):
    """The evaluate and register stages run with sentinel secrets in their environment."""
    import shutil

    import mlflow

    raw = repo_params(evaluate={"bootstrap": 20, "gradcam_images": 2},
                      register={"model_name": "secrets-test"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"], previous = uri, os.environ["MLFLOW_TRACKING_URI"]
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("secrets")
        with mlflow.start_run() as run:
            from pipeline.serving.pyfunc import log_model

            model_uri = log_model(checkpoint, np.zeros((32, 32, 3), np.uint8), ("Parasitized", "Uninfected"))
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = previous
        mlflow.set_tracking_uri(previous)
    (tmp_path / "models").mkdir()
    shutil.copyfile(checkpoint, tmp_path / "models" / "model.pt")
    (tmp_path / "models" / "train.json").write_text(json.dumps({"run_id": run.info.run_id,
                                                                "model_uri": model_uri}))
    env = {**os.environ, **SENTINELS, "MLFLOW_TRACKING_URI": uri}
    logs = ""
    for argv in (["evaluate.py", "models", str(prepared_synthetic), "metrics.json", "plots", "report.md"],
                 ["register.py", "models", "metrics.json", str(prepared_synthetic), "register.json"]):
        proc = subprocess.run([sys.executable, str(REPO / "stages" / argv[0]), *argv[1:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs += proc.stdout + proc.stderr
    assert "secrets-test v1 is the first model" in logs
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in everything) and any(p.suffix == ".md" for p in everything)
    for secret in SENTINELS.values():
        assert secret not in logs
        for path in everything:
            assert secret.encode() not in path.read_bytes(), f"{secret} leaked into {path}"

