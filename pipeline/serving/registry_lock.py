"""One writer at a time per registered model: a lock that is itself a registered model
(``<name>.register-lock``), whose creation is atomic in MLflow's database stores (sqlite,
PostgreSQL, MySQL, and a tracking server over one). MLflow's file store checks the name, then
creates it: two registers starting in the same instant could both pass there."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Callable, Iterator

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import UserError

log = logging.getLogger(__name__)


LOCK_SUFFIX = ".register-lock"


class RegistryBusy(UserError):
    """Another register of the same model holds the lock for too long."""


@contextlib.contextmanager
def registry_lock(name: str, timeout_s: float = 600.0, stale_s: float = 3600.0,
                  on_busy: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the registry's lock on model ``name`` (a registered model ``<name>.register-lock``).

    Creating a registered model is atomic in a database store (a unique name), so this is a
    mutex across processes and machines that share the tracking server. A lock older
    than ``stale_s`` (its holder died) is broken. ``on_busy`` (a test hook) is called each
    time the lock is found held by another register, before this one waits for it.
    """
    client = mlflow.MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, description=f"held while a register of '{name}' "
                                           "runs; delete it only if none is running")
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
            # On a name conflict MLflow reads the existing model back; "does not exist" means
            # the holder released it in between (seen in CI): free, so try again at once.
            released = exc.error_code == "RESOURCE_DOES_NOT_EXIST"
        if on_busy is not None and not released:
            on_busy()
        if time.monotonic() > deadline:  # bounds the immediate retries too
            raise RegistryBusy(f"registered model '{lock}' has been held for over {timeout_s:g} s "
                               "by another register; if none is running, delete it in the MLflow UI")
        if released:
            continue
        if _stale(client, lock, stale_s):
            with contextlib.suppress(MlflowException):  # another waiter may break it first
                client.delete_registered_model(lock)
        time.sleep(0.1 + random.random() * 0.2)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _stale(client, lock: str, stale_s: float) -> bool:
    try:
        created = client.get_registered_model(lock).creation_timestamp / 1000
    except MlflowException:
        return False  # released meanwhile
    return time.time() - created > stale_s
