"""train: real Ray Train fits - a driver, then a worker, killed mid-run; divergence (repeatability:
tests/test_demo.py, against the demo's train stage)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.data.augment import policy
from pipeline.training.driver import train
from tests.conftest import has_committed_checkpoint, own_ray_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared_medium(tmp_path_factory) -> Path:
    """~700 synthetic cells at 40 px: epochs of a few seconds, long enough to interrupt."""
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare
    from pipeline.data.synthetic import make_archive

    root = tmp_path_factory.mktemp("medium")
    archive = make_archive(root / "cells.zip", n_patients=24, cells_per_patient=30, seed=5)
    prepare(archive, root / "prepared", PrepareConfig(image_size=40), "malaria")
    return root / "prepared"


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(model="efficientnet_lite0", pretrained=True, epochs=4, batch_size=32,
                num_workers=2, storage_path=str(tmp_path / "ray"), max_failures=2,
                early_stopping_patience=0)  # these tests count epochs: none may stop early
    return TrainConfig(**{**base, **kw})


def _first_checkpoint(storage: Path, timeout: float = 300, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if has_committed_checkpoint(storage):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"training process exited early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint under {storage}")


DRIVER = textwrap.dedent("""
    import sys
    from pipeline.data.augment import policy
    from pipeline.config import AugmentConfig, TrainConfig
    from pipeline.training.driver import train
    from pipeline.console import setup_logging
    setup_logging()
    cfg = TrainConfig(model="efficientnet_lite0", epochs=5, batch_size=32, num_workers=2,
                      storage_path=sys.argv[2], early_stopping_patience=0, max_failures=2,
                      keep="last", ema_decay=0.9)
    r = train(cfg, policy(AugmentConfig(), 40), sys.argv[1], sys.argv[3], "tests-resume")
    print("RUN", r.run_id, r.history["epoch"].tolist(), r.best_epoch)
""")


def _committed_epoch(run_dir: Path) -> int:
    """The last epoch whose checkpoint the run's checkpoint manager committed (0: none yet)."""
    try:
        snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:  # not written yet, or replaced while we looked
        return 0
    return max((int(e) for e in re.findall(r'"epoch"\s*:\s*(\d+)', snapshot)), default=0)


def test_a_killed_driver_resumes_and_a_killed_worker_restarts_from_the_last_checkpoint(
        prepared_medium, tmp_path, tracking_uri):
    """Both restarts of one run: the driver killed like Ctrl-C on `dvc repro` (the re-run with the
    same params resumes it), then, in the re-run, a worker killed (Ray Train restarts the worker
    group from the last checkpoint, train.max_failures): one MLflow run, every epoch once, the
    final epoch's weight average kept (restored beside the weights: engine.weight_average)."""
    # storage_path as a URI (as s3://... on a cluster): the run id is read back through pyarrow
    args = [sys.executable, "-c", DRIVER, str(prepared_medium), f"file://{tmp_path / 'ray'}",
            str(tmp_path / "out")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    first = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _first_checkpoint(tmp_path / "ray", proc=first)
    finally:  # the driver, its Ray and its workers all go
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = time.time()
    run_dir = next((tmp_path / "ray").iterdir())
    run_id = (run_dir / "mlflow_run_id.txt").read_text()
    committed = _committed_epoch(run_dir)
    done_before = len(mlflow.MlflowClient().get_metric_history(run_id, "val_loss"))
    assert 1 <= committed <= done_before < 4  # two epochs or more left for the worker's kill

    worker_killed: list[tuple[int, float, int]] = []

    def kill_one_worker() -> None:
        # The re-run's own workers (a killed driver's Ray may commit a checkpoint as it dies, so
        # the snapshot alone does not tell the runs apart), once the re-run has committed an epoch.
        deadline = time.time() + 300
        while time.time() < deadline and not own_ray_processes("RayTrainWorker"):
            time.sleep(0.1)
        resumed_from = _committed_epoch(run_dir)
        while time.time() < deadline and _committed_epoch(run_dir) <= resumed_from:
            time.sleep(0.1)
        for victim in own_ray_processes("RayTrainWorker")[-1:]:
            victim.send_signal(signal.SIGKILL)
            worker_killed.append((victim.pid, time.time(), resumed_from))

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    killer.join(timeout=5)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"RUN {run_id} [1, 2, 3, 4, 5] 5" in second.stdout  # one MLflow run, every epoch, the last kept
    assert "resuming interrupted run" in second.stderr
    assert worker_killed, "no worker was killed"
    pid, when, resumed_from = worker_killed[0]
    assert resumed_from < 4, "the re-run resumed too late to lose a worker before its last epoch"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    # Epochs whose checkpoint was committed were not trained again. An epoch logged but not
    # yet committed when the driver died is trained again and logged a second time (the
    # run's history keeps the later value): the checkpoint, not the log, is the truth.
    assert {m.step for m in history} == {1, 2, 3, 4, 5}
    kept = [m for m in history if m.step <= committed]
    assert sorted(m.step for m in kept) == list(range(1, committed + 1))
    assert all(m.timestamp / 1000 < killed_at for m in kept)
    assert max(m.timestamp for m in history) / 1000 > when  # training went on after the worker's kill
    assert not run_dir.exists()  # a finished run leaves no state to resume by mistake


def test_a_diverging_loss_stops_the_run_clearly_with_no_model_and_the_champion_untouched(
        prepared_synthetic, tmp_path, tracking_uri, ray_local, model_uris):
    from pipeline.config import RegisterConfig
    from pipeline.serving.registry import promote
    from pipeline.training.driver import TrainingDiverged

    promote(RegisterConfig(), "diverge-test", model_uris(), {"roc_auc": 0.9}, "s", lambda c: None)
    # AdamW's decoupled weight decay at lr 1e10 multiplies every weight by -1e9 a step:
    # they overflow, and the loss is NaN within a few steps (seeded, the same every run).
    cfg = _cfg(tmp_path, model="baseline_cnn", pretrained=False, regime="scratch", lr=1e10,
               weight_decay=0.1, epochs=5, batch_size=16, max_failures=2)
    with pytest.raises(TrainingDiverged, match=r"training diverged: the training loss became nan .*"
                                               r"Lower train.lr \(now 1e\+10\)"):
        train(cfg, policy(AugmentConfig(), 32), prepared_synthetic, tmp_path / "out", "tests-diverge")
    assert not (tmp_path / "out" / "model.pt").exists()
    assert list((tmp_path / "ray").iterdir()) == []  # nothing to resume into the same divergence
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("tests-diverge").experiment_id])[0]
    assert run.info.status == "FAILED" and "nan" in run.data.tags["diverged"]
    assert not mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    champion = client.get_model_version_by_alias("diverge-test", "champion")
    assert str(champion.version) == "1" and len(client.search_model_versions("name='diverge-test'")) == 1
