"""Ray start-up: join the cluster in ``RAY_ADDRESS`` or start a local instance on loopback;
and what a stage asks of that cluster, checked before anything starts to wait for it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from typing import Iterator, Mapping

from pipeline.config import ScoreConfig, TrainConfig, UserError
from pipeline.env import set_quiet_env

log = logging.getLogger(__name__)

# A local instance never takes one of Ray's well-known ports (GCS, dashboard, client server,
# dashboard agent), so a `ray start --head` on this machine still gets its defaults.
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})
# Ports of a local instance that Ray binds itself when given 0 (the OS picks a free one at
# bind time: two instances cannot collide, and nothing can take the port between a pick and
# the bind). ray.init passes none of these through; 0 is Ray 2.60's default for all but the
# dashboard agent's HTTP port, which stays at 52365 (a second instance then runs without it:
# no job submission, "No available agent to submit job").
OS_ASSIGNED_PORTS = {
    "gcs_server_port": 0, "node_manager_port": 0, "object_manager_port": 0,
    "dashboard_agent_listen_port": 0, "metrics_agent_port": 0, "metrics_export_port": 0,
    "runtime_env_agent_port": 0, "min_worker_port": 0, "max_worker_port": 0,
}
STARTS = 3  # the dashboard port is picked free, then bound: someone may take it in between
AUTO_MAX_WORKERS = 8  # train.num_workers: auto on CPU, at most this many (as score's actors)


def is_local() -> bool:
    """Whether :func:`init_ray` starts a local instance (no ``RAY_ADDRESS``: not in a Ray job)."""
    return not os.environ.get("RAY_ADDRESS")


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local Ray on loopback.

    A local instance advertises 127.0.0.2 (with 127.0.0.1 Ray swaps in the machine's
    external address) and its dashboard stays on loopback; Ray's own gRPC servers
    still listen on every interface, behind its token authentication
    (docs/reliability.md). Each local instance has ports of its own, so two pipelines
    can run side by side (docs/cluster.md).
    """
    set_quiet_env()
    if not sys.stdout.isatty():  # Ray colours worker prefixes even in a file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    local = is_local()
    if local and "ray" not in sys.modules:  # Ray reads these when it is imported
        # Token authentication stays on. Naming the mode skips Ray's notice about it; a token
        # made for this instance (its processes inherit it) keeps Ray from writing ~/.ray.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    from pipeline.console import adopt_library_loggers

    if ray.is_initialized():
        return
    if local:
        _start_local(num_cpus)
    else:
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
    adopt_library_loggers()


def _start_local(num_cpus: int | None) -> None:
    """A local instance with ports of its own: the dashboard on a port picked free here, every
    other port bound by Ray at 0. Its processes (and so its workers) are told where its
    dashboard is: Ray's state API, which Ray Train's controller uses, otherwise refuses to
    choose between two local instances ("Found multiple active Ray instances")."""
    import ray

    ip = os.environ.get("PIPELINE_RAY_NODE_IP", "127.0.0.2")
    for start in range(1, STARTS + 1):
        port = free_port()
        with _ray_params(OS_ASSIGNED_PORTS), _environ(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}"):
            context = ray.init(_node_ip_address=ip, num_cpus=num_cpus, dashboard_port=port,
                               logging_level=logging.WARNING)
        if (context.dashboard_url or "").endswith(f":{port}"):
            return
        if start == STARTS:
            log.warning("Ray's dashboard did not start on port %d (see Ray's session logs); "
                        "Ray's state API may not find this instance", port)
            return
        ray.shutdown()  # the port was taken between the pick and the bind: start again


def free_port() -> int:
    """A port free on every interface (Ray's servers listen on all of them), not one of Ray's
    well-known ports."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``values`` in the environment inside the block only: Ray's processes started there
    inherit them, and nothing this process starts later does."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _ray_params(ports: Mapping[str, int]) -> Iterator[None]:
    """Inside the block, the local instance ``ray.init`` starts gets ``ports`` too. ``ray.init``
    takes none of them, so this fills them into Ray's own parameter object (a private class of
    Ray 2.60; tests/test_cluster_resources.py fails if an upgrade moves it)."""
    try:
        from ray._private import parameter
    except ImportError:  # another Ray: start with its defaults
        log.warning("this Ray has no ray._private.parameter; local instances use its default ports")
        yield
        return
    original = parameter.RayParams

    class LocalRayParams(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**ports, **{k: v for k, v in kwargs.items() if v is not None}})

    parameter.RayParams = LocalRayParams
    try:
        yield
    finally:
        parameter.RayParams = original


@dataclass(frozen=True)
class ClusterSize:
    """What a Ray cluster has now: CPUs and GPUs in all, and the most CPUs of one node."""

    cpus: float
    gpus: float
    node_cpus: float

    @classmethod
    def now(cls) -> ClusterSize:
        """The connected cluster's resources (``ray.cluster_resources()``, its live nodes)."""
        import ray

        total = ray.cluster_resources()
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        return cls(total.get("CPU", 0.0), total.get("GPU", 0.0), max(nodes, default=0.0))


@dataclass(frozen=True)
class ResourceAsk:
    """What a stage asks Ray for: ``count`` workers or actors of ``cpus`` CPUs and ``gpus`` GPUs
    each, and the params that set them (named in the message when it cannot fit)."""

    stage: str
    unit: str  # "worker" or "actor"
    count: int
    cpus: float
    gpus: int
    count_param: str
    count_auto: str  # the value that fits the count to the cluster
    cpu_param: str  # "" where no param sets the CPUs of one
    gpu_param: str


def _amount(n: float, unit: str) -> str:
    return f"no {unit}" if n == 0 else f"{n:g} {unit}{'' if n == 1 else 's'}"


def shortfall(ask: ResourceAsk, have: ClusterSize) -> str | None:
    """Why ``ask`` cannot fit in ``have``, naming the param to set; None if it fits."""
    asked = f"{ask.stage} asks for {_amount(ask.count, ask.unit)}"
    there = f"the Ray cluster has {_amount(have.gpus, 'GPU')} and {_amount(have.cpus, 'CPU')}"
    if ask.gpus and ask.count * ask.gpus > have.gpus:
        fix = (f"set {ask.gpu_param}: false" if have.gpus < ask.gpus else
               f"set {ask.count_param}: {int(have.gpus // ask.gpus)} (or {ask.count_auto})")
        return (f"{asked} x {_amount(ask.gpus, 'GPU')} = {_amount(ask.count * ask.gpus, 'GPU')}; "
                f"{there}: {fix}")
    if ask.cpu_param and ask.cpus > have.node_cpus:
        return (f"{ask.stage} asks for {ask.unit}s of {_amount(ask.cpus, 'CPU')} each; the largest "
                f"Ray node has {_amount(have.node_cpus, 'CPU')}: set {ask.cpu_param}: "
                f"{have.node_cpus:g} or less")
    if ask.count * ask.cpus > have.cpus + 1e-9:
        return (f"{asked} x {_amount(ask.cpus, 'CPU')} = {_amount(ask.count * ask.cpus, 'CPU')}; "
                f"{there}: set {ask.count_param}: {int(have.cpus // ask.cpus)} (or "
                f"{ask.count_auto})" + (f", or lower {ask.cpu_param}" if ask.cpu_param else ""))
    return None


def check_fits(ask: ResourceAsk, have: ClusterSize) -> None:
    """Raise :class:`UserError` at once if ``ask`` cannot fit in a local instance. On a cluster
    (``RAY_ADDRESS``) warn instead: an autoscaler may add the nodes, and Ray waits for them."""
    problem = shortfall(ask, have)
    if problem is None:
        return
    if is_local():
        raise UserError(problem)
    log.warning("%s. Not there now: Ray waits for an autoscaler to add it (Ray Train gives up on "
                "its workers after 60 s and retries)", problem)


def resolve_num_workers(cfg: TrainConfig, have: ClusterSize) -> int:
    """``train.num_workers``; ``auto``: one per GPU of ``have`` with ``use_gpu``, else one per
    ``cpus_per_worker`` of its CPUs, at most 8.

    On 2 cores, 2 workers x 1 CPU trained 1.21x as fast as 1 worker x 2 CPUs (68.7 against
    57.0 img/s, docs/performance.md), 1.35x in an earlier clean run (docs/development.md,
    measurement history): one team of torch threads pays for every wake-up of Ray's own
    processes, one-thread workers do not. The cap keeps the global batch (``batch_size`` x
    workers) near the one the params were chosen at."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    if cfg.use_gpu:
        return max(1, int(have.gpus))
    return max(1, min(AUTO_MAX_WORKERS, int(have.cpus // cfg.cpus_per_worker)))


def fit_training(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``num_workers`` resolved, checked against the connected cluster before any
    trainer starts (else Ray Train waits 60 s for workers that cannot be placed, and retries)."""
    have = ClusterSize.now()
    workers = resolve_num_workers(cfg, have)
    check_fits(ResourceAsk("train", "worker", workers, cfg.cpus_per_worker, int(cfg.use_gpu),
                           "train.num_workers", "auto", "train.cpus_per_worker", "train.use_gpu"), have)
    return dataclasses.replace(cfg, num_workers=workers)


def check_scoring(cfg: ScoreConfig, actors: int) -> None:
    """Check ``actors`` predictor actors against the connected cluster before the dataset starts:
    each ``cpus_per_actor`` CPUs, or with ``use_gpu`` one GPU and the one CPU Ray Data reserves
    with a GPU (``cpus_per_actor`` is not passed then)."""
    gpu = cfg.use_gpu
    check_fits(ResourceAsk("score", "actor", actors, 1.0 if gpu else cfg.cpus_per_actor, int(gpu),
                           "score.concurrency", "0, automatic", "" if gpu else "score.cpus_per_actor",
                           "score.use_gpu"), ClusterSize.now())
