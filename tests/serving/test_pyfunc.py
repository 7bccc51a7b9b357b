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

from pipeline.data.synthetic import png_bytes, synthetic_cell
from tests.conftest import REPO, free_port


@pytest.fixture(scope="module")
def served(model_uris):
    """The logged test model, loaded through pyfunc as a user would."""
    return mlflow.pyfunc.load_model(model_uris())


def test_good_inputs_give_one_row_each_and_the_evaluation_path_probabilities(served, checkpoint,
                                                                            prepared_synthetic):
    from pipeline.data.images import load_rgb
    from pipeline.data.prepared import PreparedData
    from pipeline.serving.inference import Predictor

    data = PreparedData(prepared_synthetic)
    test = data.split("test")
    files = [(data.images_dir / p).read_bytes() for p in test.paths]
    expected = Predictor.from_checkpoint(checkpoint).predict_resized(test.images, tta=True)  # score.tta
    cols = ["prob_Parasitized", "prob_Uninfected"]
    out = served.predict(pd.DataFrame({"image": files}))
    assert len(out) == len(files) and out["error"].isna().all()
    assert np.allclose(out[cols].to_numpy(), expected, atol=1e-5)
    decoded = [load_rgb(f) for f in files]
    model = served.unwrap_python_model()
    assert np.allclose(model.predict_arrays(decoded)[cols].to_numpy(), expected, atol=1e-5)
    batch = np.stack(decoded[:3]) if len({d.shape for d in decoded[:3]}) == 1 else np.asarray(test.images[:3])
    assert len(model.predict_arrays(batch)) == 3
    one_view = served.predict(pd.DataFrame({"image": files[:2]}), params={"tta": False})
    assert len(one_view) == 2 and not np.allclose(one_view[cols].to_numpy(), expected[:2], atol=1e-7)


def _cell() -> np.ndarray:
    return synthetic_cell(np.random.default_rng(5), True, 40)


# Inputs the model must never answer with a label: (description, input).
BAD_FOR_PREDICT = {
    "one HxWx3 array": lambda: _cell(),
    "a list of arrays": lambda: [_cell(), _cell()],
    "a path string": lambda: "cells/cell1.png",
    "a list of paths": lambda: ["cells/cell1.png", "cells/cell2.png"],
    "None": lambda: None,
    "a PIL image": lambda: __import__("PIL.Image").Image.fromarray(_cell()),
    "a DataFrame without an image column": lambda: pd.DataFrame({"img": [png_bytes(_cell())]}),
    "arrays in the image column": lambda: pd.DataFrame({"image": [_cell()]}),
    "base64 text in the image column": lambda: pd.DataFrame({"image": ["aGVsbG8="]}),
    "a text file's bytes": lambda: pd.DataFrame({"image": [b"this is not an image"]}),
    "an empty file": lambda: pd.DataFrame({"image": [b""]}),
    "a truncated png": lambda: pd.DataFrame({"image": [png_bytes(_cell())[:200]]}),
}
BAD_FOR_ARRAYS = {
    "one HxWx3 array": lambda: _cell(),
    "a float image scaled 0..1": lambda: [_cell().astype(np.float32) / 255],
    "a float batch": lambda: np.stack([_cell()]).astype(np.float64),
    "a grey 2-D image": lambda: [_cell()[..., 0]],
    "an RGBA image": lambda: [np.dstack([_cell(), np.full((40, 40), 255, np.uint8)])],
    "None": lambda: None,
    "a path string": lambda: "cells/cell1.png",
    "a list of paths": lambda: ["cells/cell1.png"],
    "encoded bytes": lambda: [png_bytes(_cell())],
    "a PIL image": lambda: [__import__("PIL.Image").Image.fromarray(_cell())],
}


def _never_labels(call) -> str:
    """Run ``call``: it must raise, or return rows that carry an error and no label."""
    try:
        out = call()
    except (mlflow.exceptions.MlflowException, ValueError, TypeError) as exc:
        assert str(exc), "an error with no message"
        return "refused"
    assert len(out) and out["predicted_label"].isna().all() and out["error"].notna().all(), out
    return "error rows"


@pytest.mark.parametrize("case", list(BAD_FOR_PREDICT))
def test_bad_inputs_to_predict_never_get_a_label(served, case):
    _never_labels(lambda: served.predict(BAD_FOR_PREDICT[case]()))


@pytest.mark.parametrize("case", list(BAD_FOR_ARRAYS))
def test_bad_inputs_to_predict_arrays_are_refused_with_what_to_pass(served, case):
    from pipeline.serving.pyfunc import ModelInputError

    with pytest.raises(ModelInputError, match="pass a list of HxWx3 uint8"):
        served.unwrap_python_model().predict_arrays(BAD_FOR_ARRAYS[case]())


def test_error_rows_say_what_is_wrong_in_words(served):
    out = served.predict(pd.DataFrame({"image": [b"this is not an image", _cell().tobytes()[:10]]}))
    for error in out["error"]:
        assert "not a readable image" in error and " at 0x" not in error and "<" not in error


def test_the_model_has_a_signature_and_is_logged_as_code(served):
    sig = served.metadata.signature
    assert sig.inputs.input_names() == ["image"] and sig.params.params[0].name == "tta"
    assert "prob_Parasitized" in sig.outputs.input_names()
    assert served.metadata.flavors["python_function"].get("model_code_path", "").endswith("served_model.py")


def test_registered_pyfunc_predicts_raw_images_in_a_fresh_process(model_uris, tracking_uri, tmp_path):
    uri = model_uris()
    mv = mlflow.register_model(uri, "fresh-process-test")
    mlflow.MlflowClient().set_registered_model_alias("fresh-process-test", "champion", mv.version)
    script = textwrap.dedent("""
        import mlflow, numpy as np, pandas as pd, io
        from PIL import Image
        rng = np.random.default_rng(0)
        images = []
        for h, w in [(50, 70), (130, 90), (20, 20)]:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
        model = mlflow.pyfunc.load_model("models:/fresh-process-test@champion")
        out = model.predict(pd.DataFrame({"image": images}))
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
    import urllib.error
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
            [base64.b64encode(img).decode()], [base64.b64encode(b"junk").decode()],
            [base64.b64encode(png_bytes(np.full((70, 70, 3), 180, np.uint8))).decode()]]}}).encode()
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
        for malformed in ({"dataframe_split": {"columns": ["img"], "data": [["x"]]}},
                          {"inputs": [[[0, 0, 0]]]}):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps(malformed).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=30)
            assert refused.value.code == 400, malformed
        rows = reply["predictions"]
        error = rows[0]["error"]
        assert rows[0]["predicted_label"] in {"Parasitized", "Uninfected"}
        assert error is None or error != error  # null, or NaN after JSON
        label = rows[1]["predicted_label"]
        assert (label is None or label != label) and "not a readable image" in rows[1]["error"]
        assert [r["status"] for r in rows] == ["ok", "error", "rejected"]
        blank = rows[2]  # refused over REST as everywhere: a reason, no label, no probabilities
        assert "near-uniform" in blank["reason"]
        assert all(blank[k] is None or blank[k] != blank[k]
                   for k in ("predicted_label", "probability", "prob_Parasitized", "prob_Uninfected"))
        assert len(rows) == 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_packaged_code_is_the_closure_of_the_served_model(tmp_path):
    from pipeline.imports import module_closure, module_file
    from pipeline.serving.pyfunc import packaged_code

    target = packaged_code(tmp_path)
    shipped = {str(p.relative_to(target)) for p in target.rglob("*.py")}
    assert {"__init__.py", "serving/__init__.py", "serving/pyfunc.py", "serving/inference.py",
            "data/images.py", "models.py", "data/augment.py"} <= shipped
    assert not {"training/driver.py", "evaluation/evaluate.py", "plots.py", "serving/score.py",
                "data/prepare.py"} & shipped
    closure = module_closure(["pipeline.serving.pyfunc", "pipeline.serving.inference"])
    assert shipped == {str(module_file(m).relative_to(REPO / "pipeline")) for m in closure}
    for name in shipped:  # the same bytes as the package's own files
        assert (target / name).read_bytes() == (REPO / "pipeline" / name).read_bytes()