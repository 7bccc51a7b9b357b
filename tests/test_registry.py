"""registry: the pyfunc on raw images (fresh process), and the champion rule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.config import RegisterConfig
from pipeline.registry import decode_inputs, promote
from pipeline.synthetic import png_bytes, synthetic_cell
from tests.conftest import free_port

CFG = RegisterConfig(metric="roc_auc", alias="champion")


def _metrics(auc: float) -> dict:
    return {"roc_auc": auc, "accuracy": 0.9}


def test_worse_model_does_not_take_the_alias(model_uris):
    name = "rule-test"
    first = promote(CFG, name, model_uris(), _metrics(0.90), "split-a", lambda uri: pytest.fail())
    assert first.promoted and first.champion_before is None
    worse = promote(CFG, name, model_uris(), _metrics(0.85), "split-a", lambda uri: pytest.fail())
    assert not worse.promoted and "stays without the alias" in worse.summary()
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    tie = promote(CFG, name, model_uris(), _metrics(0.90), "split-a", lambda uri: pytest.fail())
    assert not tie.promoted  # only a strictly better model moves the alias
    better = promote(CFG, name, model_uris(), _metrics(0.95), "split-a", lambda uri: pytest.fail())
    assert better.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == better.version
    tags = client.get_model_version(name, better.version).tags
    assert tags["split_id"] == "split-a" and float(tags["test_roc_auc"]) == pytest.approx(0.95)


def test_champion_from_another_split_is_rescored_on_this_one(model_uris):
    name = "rescore-test"
    promote(CFG, name, model_uris(), _metrics(0.99), "old-split", lambda uri: pytest.fail())
    seen = []

    def rescore(uri: str) -> dict:
        seen.append(uri)
        return _metrics(0.80)  # the old champion is weaker on the new split

    result = promote(CFG, name, model_uris(), _metrics(0.90), "new-split", rescore)
    assert seen == [f"models:/{name}/1"]
    assert result.promoted and result.champion_value == pytest.approx(0.80)


def test_lower_is_better_metric_and_unknown_metric(model_uris):
    cfg = RegisterConfig(metric="log_loss")
    promote(cfg, "loss-test", model_uris(), {"log_loss": 0.30}, "s", lambda u: pytest.fail())
    assert promote(cfg, "loss-test", model_uris(), {"log_loss": 0.20}, "s", lambda u: pytest.fail()).promoted
    with pytest.raises(ValueError, match="not among the test metrics"):
        promote(RegisterConfig(metric="auroc"), "x", model_uris(), _metrics(0.9), "s", None)


def test_decode_inputs_accepts_every_form_and_reports_bad_items():
    img = synthetic_cell(np.random.default_rng(0), True, 30)
    import base64

    images, errors = decode_inputs([img, png_bytes(img), base64.b64encode(png_bytes(img)).decode(),
                                    b"not an image", np.zeros((4, 4))])
    assert [e is None for e in errors] == [True, True, True, False, True]
    assert all(im.shape == (30, 30, 3) for im in images[:3])
    assert images[4].shape == (4, 4, 3)
    frame_images, _ = decode_inputs(pd.DataFrame({"image": [png_bytes(img)]}))
    assert np.array_equal(frame_images[0], img)


def test_registered_pyfunc_predicts_raw_images_in_a_fresh_process(model_uris, tracking_uri, tmp_path):
    uri = model_uris()
    mv = mlflow.register_model(uri, "fresh-process-test")
    mlflow.MlflowClient().set_registered_model_alias("fresh-process-test", "champion", mv.version)
    script = textwrap.dedent("""
        import mlflow, numpy as np, io
        from PIL import Image
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(50, 70), (130, 90), (20, 20)]]
        model = mlflow.pyfunc.load_model("models:/fresh-process-test@champion")
        out = model.predict(images)
        assert len(out) == 3, out
        assert out["error"].isna().all(), out
        assert set(out["predicted_label"]) <= {"Parasitized", "Uninfected"}
        p = out[["prob_Parasitized", "prob_Uninfected"]].sum(axis=1)
        assert np.allclose(p, 1.0, atol=1e-5), p
        print("OK", out["predicted_label"].tolist())
    """)
    # A fresh interpreter outside the repository: the model must carry its own code.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_margin_and_rollback_restore_the_previous_champion(model_uris):
    from pipeline.registry import rollback

    name = "rollback-test"
    cfg = RegisterConfig(metric="roc_auc", margin=0.02)
    v1 = promote(cfg, name, model_uris(), _metrics(0.90), "s", lambda u: pytest.fail())
    small = promote(cfg, name, model_uris(), _metrics(0.91), "s", lambda u: pytest.fail())
    assert not small.promoted  # better, but not by the margin
    v3 = promote(cfg, name, model_uris(), _metrics(0.95), "s", lambda u: pytest.fail())
    assert v3.promoted
    client = mlflow.MlflowClient()
    assert client.get_model_version(name, v3.version).tags["previous_champion"] == v1.version
    left, now = rollback(name)
    assert (left, now) == (v3.version, v1.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1.version
    assert "rolled_back" in client.get_model_version(name, v3.version).tags
    rollback(name, to=small.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == small.version
    with pytest.raises(ValueError, match="no alias"):
        rollback(name, alias="no-such-alias")


def test_register_tags_provenance(model_uris, prepared_synthetic):
    from pipeline.registry import register

    result = register(RegisterConfig(), "provenance-test", model_uris(), _metrics(0.9),
                      prepared_synthetic, "Parasitized", params={"train": {"epochs": 3}})
    tags = mlflow.MlflowClient().get_model_version("provenance-test", result.version).tags
    assert len(tags["dataset_id"].split("-")) == 3 and tags["git_commit"]
    assert '"epochs": 3' in tags["params"] and tags["test_accuracy"] == "0.900000"


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_rest_request(model_uris, tracking_uri, tmp_path):
    import base64
    import json
    import time
    import urllib.request

    mv = mlflow.register_model(model_uris(), "serve-test")
    mlflow.MlflowClient().set_registered_model_alias("serve-test", "champion", mv.version)
    port = free_port()
    from pipeline.project import dvc_env

    env = {**dvc_env(), "MLFLOW_TRACKING_URI": tracking_uri}  # the venv's uvicorn on PATH
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/serve-test@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        img = png_bytes(synthetic_cell(np.random.default_rng(3), True, 70))
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(img).decode()], [base64.b64encode(b"junk").decode()]]}}).encode()
        deadline, reply = time.time() + 120, None
        while time.time() < deadline and reply is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(1)
        assert reply is not None, "server did not answer in 120 s"
        rows = reply["predictions"]
        error = rows[0]["error"]
        assert rows[0]["predicted_label"] in {"Parasitized", "Uninfected"}
        assert error is None or error != error  # null, or NaN after JSON
        label = rows[1]["predicted_label"]
        assert (label is None or label != label) and "image" in rows[1]["error"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
