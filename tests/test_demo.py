"""The first hour: `pipeline demo` as a new user meets it. Its console is mostly lines a
person needs, its `dvc repro` ran every stage and each recorded what it should (hand-offs,
MLflow, the registry, a no-op second repro), it is a git repository where DVC's experiment
commands work, and its `dvc plots show` page draws every plot in a real browser with the
network blocked."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline.clinical import binary_metrics
from pipeline.data.prepared import PreparedData
from pipeline.project import REPO_ROOT, dvc, git, scaffold
from tests.conftest import free_port

VEGA_PLOTS = 6  # the Vega (not image) plots dvc.yaml defines
# Where Chromium calls on its own (sign-in, time, updates), at moments that vary run to run.
CHROMIUM_OWN = re.compile(r"(^|\.)(google|googleapis|gstatic|gvt1)\.com$")
WIDTH = 120


def useful_lines():
    spec = importlib.util.spec_from_file_location("useful_lines", REPO_ROOT / "tools/useful_lines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo, run as `make demo` runs it; its folder and everything it printed."""
    root = tmp_path_factory.mktemp("first-hour") / "demo"
    out = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--dir", str(root), "--patients",
                          "8", "--cells", "16", "--epochs", "1", "--image-size", "32"],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert out.returncode == 0, out.stdout.decode(errors="replace")[-3000:]
    return root, out.stdout.decode(errors="replace")


@pytest.mark.slow
def test_demo_console_is_lines_a_person_needs(demo):
    root, output = demo
    counter = useful_lines()
    kinds = [counter.kind(line) for line in counter.lines(output)]
    share = sum(k != "noise" for k in kinds) / len(kinds)
    assert share >= 0.8, "\n".join(f"{k:>8} {line}" for k, line in zip(kinds, counter.lines(output)))
    assert "\x1b[" not in output  # no colour codes when the output is not a terminal
    for stage in ("download", "prepare", "augment", "train", "evaluate", "register", "score"):
        assert f"== {stage}: " in output
        assert (root / "logs" / f"{stage}.log").is_file()  # the detail went there
    assert re.search(r"epoch 1/1: train loss", output)
    assert "TrainingReport(" not in output and "Token authentication is enabled" not in output
    # Synthetic data is called synthetic wherever a person reads about it.
    assert "**Synthetic** demo images" in (root / "reports/data_card.md").read_text()
    assert "synthetic demo images, not real cells" in (root / "reports/evaluate.md").read_text()


@pytest.mark.slow
def test_dvc_repro_ran_every_stage_and_recorded_each(demo):
    """The demo's `dvc repro` (every stage, default TTA) as the stages' hand-offs, MLflow and
    DVC see it. Real cells through every stage: tests/test_cluster.py (`dvc repro` in a Ray
    job) and tests/bench/test_gpu.py (each stage's command)."""
    root, _ = demo
    assert (root / "data/raw/malaria.zip").stat().st_size == (root / "synthetic_cells.zip").stat().st_size
    manifest = pd.read_parquet(root / "data/prepared/manifest.parquet")
    assert len(manifest) == 8 * 16  # every readable cell (the demo's one truncated PNG is not)
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    history = pd.read_csv(root / "plots/train/history.csv")
    assert history["epoch"].tolist() == [1] and history["val_loss"].notna().all()
    assert (root / "models/model.pt").is_file()
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert {"accuracy", "roc_auc", "sensitivity", "specificity", "f1", "confusion_matrix"} <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == (manifest["split"] == "test").sum()
    for plot in ("roc.csv", "pr.csv", "confusion.csv", "reliability.csv", "roc.png",
                 "confusion_matrix.png", "gradcam_worst_errors.png"):
        assert (root / "plots/evaluate" / plot).stat().st_size > 0
    report = (root / "reports/evaluate.md").read_text()
    assert re.search(r"^## Patients \(\d+\)$", report, re.M) and "bootstrap over" in report
    assert "| PPV (precision)" in report
    registered = json.loads((root / "models/register.json").read_text())
    assert registered["promoted"] and registered["version"] == "1" and registered["name"] == "malaria-demo"
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # not the global URI: later modules use it
    version = client.get_model_version("malaria-demo", "1")
    tags = version.tags
    assert {"dataset_id", "git_commit", "run_id", "split_id", "test_roc_auc"} <= set(tags)
    assert len(tags) <= 15 and all(len(v) < 500 for v in tags.values())  # no wall of tags
    assert "is the first model: alias set" in version.description and tags["run_id"] in version.description
    scores = pd.read_parquet(root / "data/scores/predictions.parquet")
    assert len(scores) == metrics["n"] and scores["error"].isna().all()
    assert set(scores["path"]) == set(manifest.loc[manifest["split"] == "test", "path"])
    patients = pd.read_parquet(root / "data/scores/predictions_patients.parquet")
    test_patients = set(manifest.loc[manifest["split"] == "test", "patient_id"])
    assert set(patients["patient_id"]) == test_patients and patients["cells"].sum() == len(scores)

    run_id = json.loads((root / "models/train.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert {"train_loss", "val_loss", "val_acc", "test_accuracy", "test_roc_auc"} <= set(run.data.metrics)
    assert metrics["tta"] and run.data.metrics["test_tta"] == 1.0  # validate scores as evaluate did
    assert run.data.params["train.model"] == "efficientnet_lite0"
    assert run.info.run_name == "workspace/efficientnet_lite0-finetune_all-32px-1ep"
    note = run.data.tags["mlflow.note.content"]
    assert "SYNTHETIC demo images" in note and "Split by patient" in note and "Test figures on" in note
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"malaria-train", "malaria-val"}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"params.yaml", "reports", "plots"} <= artifacts
    assert {"plots/evaluate", "plots/train"} <= {a.path for a in client.list_artifacts(run_id, "plots")}
    description = client.get_registered_model("malaria-demo").description
    assert "## Input contract" in description and "## Validation" in description
    champion = client.get_model_version_by_alias("malaria-demo", "champion")
    assert str(champion.version) == "1"

    # A second repro does no work: every stage is found unchanged and none runs (a stage that
    # ran would rewrite its log and its outputs).
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    written = {p: p.stat().st_mtime_ns for d in ("logs", "models", "metrics", "data/scores")
               for p in (root / d).rglob("*") if p.is_file()}
    out = dvc(root, "repro", capture_output=True, text=True, timeout=600).stdout  # timeout: a hang guard
    assert "Running stage" not in out
    assert sorted(re.findall(r"^Stage '([^']+)' didn't change, skipping$", out, re.M)) == sorted(stages), out
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert {"download", "train", "score"} <= set(stages)
    assert {"train.log", "score.log", "model.pt", "evaluate.json"} <= {p.name for p in written}
    shown = dvc(root, "metrics", "show", "--json", capture_output=True, text=True).stdout
    assert "roc_auc" in shown

    # An output-neutral param (prepare.workers: the same bytes, tested in tests/data) is read by
    # its own stage only: dvc status names prepare, and no stage downstream of it.
    committed = (root / "params.yaml").read_text()
    params = yaml.safe_load(committed)
    params["prepare"]["workers"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(root, "status", "--json", capture_output=True, text=True).stdout)
    finally:  # the module's later tests start from the demo as committed
        (root / "params.yaml").write_text(committed)
    default = {stage for stage in status if ":" not in stage}  # not crossval/ or validate/, never run
    assert default == {"prepare"}, status


@pytest.mark.slow
def test_demo_is_a_dvc_experiment_sandbox(demo):
    root, _ = demo
    assert len(git(root, "log", "--oneline").splitlines()) == 2  # the copy, then its run
    assert git(root, "status", "--porcelain").strip() == ""
    run = lambda *args: dvc(root, *args, capture_output=True, text=True)  # noqa: E731
    run("exp", "run", "-S", "score.batch_size=16", "-n", "smaller-batches")
    shown = json.loads(run("exp", "show", "--json").stdout)
    names = [rev.get("name") for commit in shown for exp in commit.get("experiments") or []
             for rev in exp.get("revs") or []]
    assert "smaller-batches" in names
    assert "score.batch_size" in run("params", "diff").stdout
    assert run("plots", "diff", "HEAD", "--json").returncode == 0
    view = subprocess.run([sys.executable, "-m", "pipeline", "metrics"], cwd=root,
                          capture_output=True, text=True, check=True).stdout
    assert "smaller-batches" in view and "score.batch_size" in view
    assert max(map(len, view.splitlines())) <= WIDTH
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("malaria").experiment_id])
    assert {r.info.run_name.split("/")[0] for r in runs} == {"workspace"}  # train ran once
    assert all("SYNTHETIC demo images" in r.data.tags["mlflow.note.content"] for r in runs)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A proxy that forwards nothing: it records each request the browser tries to send."""

    seen: list[str] = []

    def _refuse(self):
        self.seen.append(f"{self.command} {self.path}")
        self.send_error(403)

    do_GET = do_POST = do_HEAD = do_CONNECT = _refuse

    def log_message(self, *args):
        pass


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed here (apt-get install chromium)")
    return found


def _open_blocked(page, profile) -> tuple[str, list[str]]:
    """``page``'s DOM after headless Chromium drew it, and every request it tried to send:
    a proxy on loopback that forwards nothing records them."""
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    _Recorder.seen = []
    try:
        dom = subprocess.run(
            [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-default-apps",
             f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}",
             "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=15000", "--dump-dom",
             page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        time.sleep(0.5)  # a request still in flight reaches the recorder
    finally:
        proxy.shutdown()
    return dom, list(_Recorder.seen)


def _hosts(requests: list[str]) -> set[str]:
    return {re.sub(r"^\w+ (https?://)?([^/:]+).*$", r"\2", r) for r in requests}


@pytest.mark.slow
def test_dvc_plots_draw_offline_in_a_real_browser(demo, tmp_path):
    root, _ = demo
    dvc(root, "plots", "show", capture_output=True)
    page = root / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    dom, requests = _open_blocked(page, tmp_path / "profile")
    views = dom.split('class="vega-embed')[1:]
    assert len(views) == VEGA_PLOTS, dom[:2000]
    for view in views:  # each drew its axes and its data
        assert 'class="marks"' in view and re.search(r'class="mark-(line|rect|symbol)', view)
    # Chromium itself calls Google's services even on an empty page; the plots page may
    # try nothing beyond that (and here nothing leaves: the proxy forwards nothing).
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    _, baseline = _open_blocked(empty, tmp_path / "profile-empty")
    unexpected = {host for host in _hosts(requests) - _hosts(baseline) if not CHROMIUM_OWN.search(host)}
    assert not unexpected, requests
    assert not [r for r in requests if re.search(r"jsdelivr|vega|unpkg|cdn", r)]


@pytest.mark.slow
def test_crossval_runs_as_a_dvc_experiment_outside_the_default_pipeline(demo):
    root, _ = demo
    assert not (root / "metrics" / "crossval.json").exists()  # the default repro left it alone
    # One worker a fold: the two folds' trials share the two cores side by side (the Tune and
    # multi-worker paths are tested in tests/selection and tests/training).
    dvc(root, "exp", "run", "crossval/dvc.yaml", "-S", "crossval.folds=2", "-S", "train.num_workers=1",
        "-n", "cv2", capture_output=True, text=True)
    metrics = json.loads((root / "metrics" / "crossval.json").read_text())
    data = PreparedData(root / "data" / "prepared")
    pool = data.manifest.query("split != 'test'")
    assert metrics["folds"] == 2 and metrics["cells"] == len(pool)
    assert metrics["patients"] == pool["patient_id"].nunique()
    for name in ("crossval.md", "oof.parquet", "label_issues.csv", "label_issues.png"):
        assert (root / "reports" / "crossval" / name).is_file()
    assert (root / "reports" / "crossval" / "crossval.md").read_text().count("nan") == 0
    oof = pd.read_parquet(root / "reports" / "crossval" / "oof.parquet")
    assert sorted(oof["path"]) == sorted(pool["path"])  # every pool cell once, out of fold
    assert not set(oof["patient_id"]) & set(data.rows("test")["patient_id"])
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1
    recomputed = binary_metrics((oof["label"] == "Parasitized").to_numpy(), oof["p_pos"].to_numpy())
    assert metrics["accuracy"] == pytest.approx(recomputed["accuracy"])
    assert metrics["roc_auc"] == pytest.approx(recomputed["roc_auc"])
    shown = dvc(root, "metrics", "show", "--json", capture_output=True, text=True).stdout
    assert "crossval.json" in shown
    # Each fold a trial, an MLflow child run of the cross-validation's run, which has the figures.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("malaria").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "cv2/crossval-2fold")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["cv2/crossval-2fold/params/fold0",
                                                         "cv2/crossval-2fold/params/fold1"]
    assert {r.info.status for r in children} == {"FINISHED"} and "failed_trials" not in parent.data.tags
    assert parent.data.metrics["params.accuracy"] == pytest.approx(metrics["accuracy"])
    assert "crossval/crossval.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "crossval")}


@pytest.mark.slow
def test_online_repro_fails_fast_with_the_documented_message(tmp_path):
    port = free_port()  # a loopback port with nothing listening: what offline looks like
    project = scaffold(tmp_path / "project", {"download": {"sources": {"malaria": {
        "url": f"http://127.0.0.1:{port}/cell_images.zip"}}}})
    with pytest.raises(subprocess.CalledProcessError) as failed:
        dvc(project, "repro", "download", capture_output=True, text=True, timeout=600)  # a hang guard only
    message = failed.value.stderr
    assert f"error: cannot reach http://127.0.0.1:{port}/cell_images.zip" in message
    assert "point the stage at a local copy" in message and "Traceback" not in message
    # Fast by the work done: the one stage ran once and stopped, leaving nothing behind (a
    # retry of the request is ruled out by tests/data/test_download.py).
    ran = re.findall(r"^Running stage '([^']+)'", failed.value.stdout + message, re.M)
    assert ran == ["download"], failed.value.stdout
    assert not [p for p in (project / "data").rglob("*") if p.is_file()]  # no archive, no .part
    readme = (REPO_ROOT / "README.md").read_text()
    assert "cannot reach" in readme and "point the stage at a local copy" in readme


@pytest.mark.slow
def test_training_again_with_the_demos_committed_params_gives_its_validation_figures(demo, tracking_uri,
                                                                                     tmp_path):
    """Repeatability: the train stage's run (a `dvc repro` subprocess), trained again here with the
    params, policy, seed and prepared cells its commit records, ends on the same validation loss
    and accuracy; two Ray Train workers, so the gradients' all-reduce is part of what repeats."""
    import ray

    from pipeline.cluster import init_ray
    from pipeline.params import read_params
    from pipeline.training.driver import train

    root, _ = demo
    committed = lambda path: git(root, "show", f"HEAD:{path}")  # noqa: E731  (later tests change the workspace)
    (tmp_path / "params.yaml").write_text(committed("params.yaml"))
    params = read_params(tmp_path / "params.yaml")
    assert params.train.num_workers == 2 and params.train.seed == 42
    stage = json.loads(committed("metrics/train.json"))
    # Ray for this test only: the demo's other tests start Ray in their own subprocesses.
    init_ray(num_cpus=2)
    try:
        again = train(replace(params.train, storage_path=str(tmp_path / "ray")),
                      yaml.safe_load(committed("models/augment.yaml")), root / "data" / "prepared",
                      tmp_path / "out", "tests-repeat")
    finally:
        ray.shutdown()
    last = again.history.iloc[-1]
    assert last["val_loss"] == pytest.approx(stage["val_loss"], abs=1e-4)
    assert last["val_acc"] == pytest.approx(stage["val_acc"], abs=1e-3)
