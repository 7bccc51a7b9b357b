"""tracking: a dead tracking server fails a run at once, naming it; a server lost mid-run
keeps the checkpoints and a re-run resumes in the same MLflow run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import yaml

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.data.augment import policy, save_policy
from tests.conftest import (
    REPO,
    free_port,
    has_committed_checkpoint,
    repo_params,
    start_mlflow_server,
    stop,
)


def test_a_dead_server_fails_the_train_stage_at_once_naming_it(prepared_synthetic, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params()))
    save_policy(AugmentConfig(), 32, tmp_path / "augment.yaml")
    dead = f"http://127.0.0.1:{free_port()}"
    # the pipeline's own retry settings, not whatever this shell or an earlier test set
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), str(prepared_synthetic),
                           "augment.yaml", "models", "train.json", "history.csv", "curves.png"], cwd=tmp_path,
                          env={**env, "MLFLOW_TRACKING_URI": dead}, capture_output=True,
                          text=True, timeout=300)  # only a guard against a hang
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last == (f"error: the MLflow tracking server {dead} does not answer: start it, or set "
                    "MLFLOW_TRACKING_URI to one that runs (unset: a local mlflow.db)")
    # No training: nothing beside the inputs but the stage's log file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["augment.yaml", "logs", "params.yaml"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["train.log"]
    # "At once" by the work done: the log holds each of urllib3's retries of the one request
    # that found the server dead. MLflow's own defaults retry 7 times with doubling waits
    # (minutes); pipeline.tracking.HTTP_DEFAULTS allows 3 (seconds).
    log = (tmp_path / "logs" / "train.log").read_text()
    retries = re.findall(r"Retrying \(Retry\(total=\d+.*?\)\) after connection broken by .*?: (\S+)$",
                         log, re.M)
    assert retries == ["/api/2.0/mlflow/experiments/search"] * 3, log[-3000:]


@pytest.mark.slow
def test_a_server_lost_mid_run_keeps_checkpoints_and_a_rerun_resumes(prepared_synthetic, tmp_path,
                                                                    ray_local, monkeypatch):
    from pipeline.tracking import TrackingUnavailable
    from pipeline.training.driver import train

    port, backend = free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    server, url = start_mlflow_server(backend, tmp_path, port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    previous = mlflow.get_tracking_uri()
    cfg = TrainConfig(model="baseline_cnn", pretrained=False, regime="scratch", epochs=4, batch_size=16,
                      num_workers=1, max_failures=0, system_metrics=False, early_stopping_patience=0,
                      storage_path=str(tmp_path / "ray"))  # counts epochs: none may stop early
    killed = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not has_committed_checkpoint(tmp_path / "ray"):
            time.sleep(0.05)
        stop(server)
        killed.append(time.time())

    try:
        threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
        with pytest.raises(TrackingUnavailable, match=f"lost the MLflow tracking server {url} during "
                                                      "training.*checkpoints are kept"):
            train(cfg, policy(AugmentConfig(), 32), prepared_synthetic, tmp_path / "out", "tests-lost")
        assert killed and has_committed_checkpoint(tmp_path / "ray")  # kept for the re-run
        server, _ = start_mlflow_server(backend, tmp_path, port)
        result = train(cfg, policy(AugmentConfig(), 32), prepared_synthetic, tmp_path / "out",
                       "tests-lost")
        assert result.history["epoch"].tolist() == [1, 2, 3, 4]
        runs = mlflow.MlflowClient(url).search_runs(
            [mlflow.MlflowClient(url).get_experiment_by_name("tests-lost").experiment_id])
        assert [r.info.run_id for r in runs] == [result.run_id]  # one run, resumed
        assert not list((tmp_path / "ray").iterdir())
    finally:
        stop(server)
        mlflow.set_tracking_uri(previous)
