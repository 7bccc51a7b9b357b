"""serving: input decoding, the pyfunc on raw images in a fresh process, the REST server,
and the code packaged with the model."""

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

from pipeline.serving import decode_inputs
from pipeline.synthetic import png_bytes, synthetic_cell
from tests.conftest import free_port


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


def test_packaged_code_is_the_closure_of_the_served_model(tmp_path):
    from pipeline.imports import module_closure
    from pipeline.serving import packaged_code

    target = packaged_code(tmp_path)
    shipped = {p.stem for p in target.iterdir()}
    assert {"__init__", "serving", "inference", "images", "models", "augment"} <= shipped
    assert not {"train", "evaluate", "plots", "score", "prepare"} & shipped
    assert shipped == {m.split(".")[-1] if m != "pipeline" else "__init__"
                       for m in module_closure(["pipeline.serving", "pipeline.inference"])}
