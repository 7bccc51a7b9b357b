"""cluster: what train and score ask of Ray is checked before anything waits for it
(``train.num_workers: auto`` resolved there), and two local Ray instances run side by side,
each on ports of its own."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.cluster import (
    ClusterSize,
    ResourceAsk,
    check_fits,
    fit_training,
    resolve_num_workers,
    shortfall,
)
from pipeline.config import AugmentConfig, ScoreConfig, TrainConfig, UserError
from pipeline.project import dvc_env
from tests.conftest import REPO, stop, wait_for

HANG_GUARD_S = 45  # without the check, Ray Train waits 60 s for its workers, then retries


def _train_ask(workers: int, cpus: float = 1.0, gpu: bool = False) -> ResourceAsk:
    return ResourceAsk("train", "worker", workers, cpus, int(gpu), "train.num_workers", "auto",
                       "train.cpus_per_worker", "train.use_gpu")


@pytest.mark.parametrize("ask, have, message", [
    (_train_ask(2, gpu=True), ClusterSize(16, 1, 16),
     "train asks for 2 workers x 1 GPU = 2 GPUs; the Ray cluster has 1 GPU and 16 CPUs: "
     "set train.num_workers: 1 (or auto)"),
    (_train_ask(1, gpu=True), ClusterSize(2, 0, 2),
     "train asks for 1 worker x 1 GPU = 1 GPU; the Ray cluster has no GPU and 2 CPUs: "
     "set train.use_gpu: false"),
    (_train_ask(3), ClusterSize(2, 0, 2),
     "train asks for 3 workers x 1 CPU = 3 CPUs; the Ray cluster has no GPU and 2 CPUs: "
     "set train.num_workers: 2 (or auto), or lower train.cpus_per_worker"),
    (_train_ask(1, cpus=4), ClusterSize(4, 0, 2),
     "train asks for workers of 4 CPUs each; the largest Ray node has 2 CPUs: "
     "set train.cpus_per_worker: 2 or less"),
    (ResourceAsk("score", "actor", 3, 1.0, 0, "score.concurrency", "0, automatic",
                 "score.cpus_per_actor", "score.use_gpu"), ClusterSize(2, 0, 2),
     "score asks for 3 actors x 1 CPU = 3 CPUs; the Ray cluster has no GPU and 2 CPUs: "
     "set score.concurrency: 2 (or 0, automatic), or lower score.cpus_per_actor"),
])
def test_what_cannot_fit_says_what_there_is_what_was_asked_and_which_param_to_set(ask, have, message):
    assert shortfall(ask, have) == message


@pytest.mark.parametrize("ask, have", [
    (_train_ask(2), ClusterSize(2, 0, 2)),
    (_train_ask(2, gpu=True), ClusterSize(16, 2, 16)),
    (_train_ask(2, cpus=1), ClusterSize(2, 0, 1)),  # one worker on each of two 1-CPU nodes
])
def test_what_fits_passes(ask, have):
    assert shortfall(ask, have) is None


def test_on_a_cluster_a_shortfall_is_a_warning_since_an_autoscaler_may_add_nodes(monkeypatch, caplog):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6379")
    with caplog.at_level(logging.WARNING, logger="pipeline.cluster"):
        check_fits(_train_ask(3), ClusterSize(2, 0, 2))
    assert "set train.num_workers: 2 (or auto)" in caplog.text and "autoscaler" in caplog.text
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(UserError, match="set train.num_workers: 2"):
        check_fits(_train_ask(3), ClusterSize(2, 0, 2))


@pytest.mark.parametrize("cfg, have, workers", [
    (TrainConfig(num_workers="auto"), ClusterSize(2, 0, 2), 2),  # the measured 2 x 1 on 2 cores
    (TrainConfig(num_workers="auto", cpus_per_worker=2.0), ClusterSize(5, 0, 5), 2),
    (TrainConfig(num_workers="auto"), ClusterSize(64, 0, 64), 8),  # capped
    (TrainConfig(num_workers="auto"), ClusterSize(0.5, 0, 0.5), 1),
    (TrainConfig(num_workers="auto", use_gpu=True), ClusterSize(16, 4, 16), 4),  # one per GPU
    (TrainConfig(num_workers="auto", use_gpu=True), ClusterSize(2, 0, 2), 1),  # then refused
    (TrainConfig(num_workers=3), ClusterSize(64, 8, 64), 3),
])
def test_num_workers_auto_is_one_per_gpu_else_one_per_cpus_per_worker_of_the_cpus(cfg, have, workers):
    assert resolve_num_workers(cfg, have) == workers


def _timed_error(call) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        call()
    return str(err.value), time.perf_counter() - t0


def test_training_that_cannot_fit_fails_at_once_naming_the_param(ray_local, prepared_synthetic,
                                                                 tracking_uri, tmp_path):
    from pipeline.data.augment import policy
    from pipeline.training.driver import train

    assert ray_local.cluster_resources().get("CPU") == 2
    cases = [(TrainConfig(num_workers=3, storage_path=str(tmp_path / "ray")),
              "train asks for 3 workers x 1 CPU = 3 CPUs; the Ray cluster has no GPU and 2 CPUs: "
              "set train.num_workers: 2 (or auto)")]
    if not ray_local.cluster_resources().get("GPU"):
        cases.append((TrainConfig(use_gpu=True, storage_path=str(tmp_path / "ray")),
                      "GPUs; the Ray cluster has no GPU and 2 CPUs: set train.use_gpu: false"))
    for cfg, message in cases:
        text, seconds = _timed_error(lambda: train(cfg, policy(AugmentConfig(), 32), prepared_synthetic,
                                                   tmp_path / "model", "resources"))
        assert message in text
        assert seconds < HANG_GUARD_S, seconds
        print(f"train failed in {seconds:.2f} s: {text}")
    assert not (tmp_path / "model").exists() and not (tmp_path / "ray").exists()
    assert fit_training(TrainConfig(num_workers="auto")).num_workers == 2


def test_scoring_that_cannot_fit_fails_at_once_naming_the_param(ray_local, model_uris, tmp_path):
    from pipeline.data.synthetic import png_bytes, synthetic_cell
    from pipeline.serving.score import score

    rng = np.random.default_rng(0)
    (tmp_path / "cells").mkdir()
    for i in range(3):
        (tmp_path / "cells" / f"cell_{i}.png").write_bytes(png_bytes(synthetic_cell(rng, i % 2 == 0)))
    uri, out = model_uris(), tmp_path / "scores" / "predictions.parquet"
    cases = [(ScoreConfig(input=str(tmp_path / "cells"), concurrency=3, local_max_images=0),
              "score asks for 3 actors x 1 CPU = 3 CPUs; the Ray cluster has no GPU and 2 CPUs: "
              "set score.concurrency: 2")]
    if not ray_local.cluster_resources().get("GPU"):
        cases.append((ScoreConfig(input=str(tmp_path / "cells"), use_gpu=True),
                      "score asks for 1 actor x 1 GPU = 1 GPU; the Ray cluster has no GPU and 2 CPUs: "
                      "set score.use_gpu: false"))
    for cfg, message in cases:
        text, seconds = _timed_error(lambda: score(cfg, uri, out))
        assert message in text
        assert seconds < HANG_GUARD_S, seconds
        print(f"score failed in {seconds:.2f} s: {text}")
    assert not out.exists()


# One local instance, held up until this process is stopped: its ports, then (once the test
# says go) a task that asks Ray's state API for the nodes without an address, as Ray Train's
# controller does, and the same from the driver through the instance's own GCS. With "taken",
# the first dashboard port it picks is one another process took after the pick.
INSTANCE = r"""
import json, os, socket, sys, time
import pipeline.cluster as cluster
picks = []
if sys.argv[2] == "taken":
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    free_port = cluster.free_port

    def taken_first():
        picks.append(free_port() if picks else held.getsockname()[1])
        return picks[-1]

    cluster.free_port = taken_first
cluster.init_ray(num_cpus=1)
import ray
from ray.util.state import list_nodes
ctx = ray.get_runtime_context()
ports = {k: v for k, v in ray.nodes()[0].items() if k.endswith("Port")}
ports["GcsPort"] = int(ctx.gcs_address.rsplit(":", 1)[1])
ports["DashboardPort"] = int(ray._private.worker.get_dashboard_url().rsplit(":", 1)[1])
print("READY " + json.dumps({"node": ctx.get_node_id(), "ports": ports, "picks": picks}), flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)

@ray.remote(num_cpus=0)
def nodes_seen_by_a_task():
    return [n.node_id for n in list_nodes()]

seen = {"task": ray.get(nodes_seen_by_a_task.remote(), timeout=60),
        "driver": [n.node_id for n in list_nodes(address=ctx.gcs_address)]}
print("CHECKED " + json.dumps(seen), flush=True)
time.sleep(600)
"""


def _line(log: Path, tag: str) -> dict | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


@pytest.mark.slow
def test_two_local_instances_run_side_by_side_on_ports_of_their_own(tmp_path):
    env = {k: v for k, v in dvc_env().items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    go = tmp_path / "go"
    logs = [tmp_path / f"instance{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", INSTANCE, str(go), taken], cwd=REPO, env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
             for log, taken in zip(logs, ("taken", "free"))]
    ray_procs: list[psutil.Process] = []
    try:
        for proc, log in zip(procs, logs):
            wait_for(lambda: _line(log, "READY") or proc.poll() is not None, 100, f"Ray in {log.name}")
        ready = [_line(log, "READY") for log in logs]
        assert all(ready), [log.read_text()[-3000:] for log in logs]
        ray_procs = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)]
        go.touch()  # both instances are up: each checks itself now
        for proc, log in zip(procs, logs):
            wait_for(lambda: _line(log, "CHECKED") or proc.poll() is not None, 60, f"checks in {log.name}")
        checked = [_line(log, "CHECKED") for log in logs]
        assert all(checked), [log.read_text()[-3000:] for log in logs]
    finally:
        for proc in procs:
            stop(proc)
    for r, c in zip(ready, checked):  # each sees its own node, and only it
        assert c == {"task": [r["node"]], "driver": [r["node"]]}
    picks = ready[0]["picks"]  # the taken port, then the one it started on
    assert len(picks) == 2 and ready[0]["ports"]["DashboardPort"] == picks[1] != picks[0], ready[0]
    first, second = (r["ports"] for r in ready)
    assert first.keys() == second.keys() and len(first) >= 8, first
    assert min(first.values()) > 0 and min(second.values()) > 0, (first, second)  # the agents' too
    assert set(first.values()).isdisjoint(second.values()), (first, second)
    _, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, alive  # stopping the process group stopped each instance


def test_local_instances_get_their_ports_through_rays_own_parameters():
    """The private class :func:`pipeline.cluster._ray_params` fills in; an upgrade of Ray that
    moves it fails here, not in two pipelines sharing a port. (Last in the module: it imports
    Ray, and the module's local instance is started before Ray is imported.)"""
    import inspect

    from ray._private import parameter

    from pipeline.cluster import OS_ASSIGNED_PORTS

    assert set(OS_ASSIGNED_PORTS) <= set(inspect.signature(parameter.RayParams).parameters)
