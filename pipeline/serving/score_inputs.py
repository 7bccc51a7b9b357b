"""What batch scoring reads: the inputs it is given (folder, zip, glob, list, a prepared
split) as ``path``/``container`` entries, and batches of them decoded and resized."""

from __future__ import annotations

import glob
import os
import threading
import zipfile
from collections import deque
from concurrent.futures import Executor
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.data.datasets import is_system_file
from pipeline.data.prepared import PreparedData
from pipeline.serving.screening import InputLimits


def list_inputs(source: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Entries (``path``, ``container``) of the input, and the skipped system files' names.

    ``source`` is a folder (searched recursively), a zip, a glob pattern
    (``cells/**/*.png``) or a ``.csv``/``.parquet`` list with a ``path`` column
    (relative paths are relative to the list). Files listed but missing are kept:
    they get a row with their error, never silently dropped.
    """
    text = str(source)
    if any(c in text for c in "*?["):
        names = sorted(str(Path(p).resolve()) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        return _split_names(names, "")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"score input {source} does not exist: give a folder, .zip, glob "
                                "or .csv/.parquet list of images (score.input)")
    if source.suffix.lower() in (".csv", ".parquet"):
        table = pd.read_csv(source) if source.suffix.lower() == ".csv" else pd.read_parquet(source)
        if "path" not in table.columns:
            raise ValueError(f"{source} needs a 'path' column of image paths")
        base = source.resolve().parent
        return pd.DataFrame({"path": [str(base / p) for p in table["path"].astype(str)],
                             "container": ""}), []
    if source.is_dir():
        names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = sorted(m.filename for m in zf.infolist() if not m.is_dir())
    else:
        raise ValueError(f"score input {source} is not a folder, zip, glob or .csv/.parquet list")
    return _split_names(names, str(source.resolve()))


def _split_names(names: list[str], container: str) -> tuple[pd.DataFrame, list[str]]:
    """Every file becomes a row (one Pillow cannot read gets an error row with the reason);
    only the operating system's own files are skipped, and returned to be named."""
    keep = [n for n in names if not is_system_file(n)]
    skipped = [n for n in names if is_system_file(n)]
    return pd.DataFrame({"path": keep, "container": container}), skipped


def split_inputs(data: PreparedData, split: str = "test") -> pd.DataFrame:
    """Image entries of one split of a prepared dataset (its original files)."""
    paths = data.rows(split)["path"].sort_values().to_numpy()
    return pd.DataFrame({"path": paths, "container": str(data.images_dir.resolve())})


def read_bytes(container: str, path: str, zf: zipfile.ZipFile | None = None) -> bytes:
    """Bytes of one input, from a folder or an open zip."""
    if zf is not None:
        return zf.read(path)
    return (Path(container) / path if container else Path(path)).read_bytes()


_open_zips = threading.local()  # each thread's open zips: reading a zip's directory once, not per batch


def _zip(container: str) -> zipfile.ZipFile | None:
    """``container`` opened as a zip, kept open for this thread's next batches (its central
    directory, 10,000 entries in the pool, took a third of decoding to parse per batch); None
    for a folder. A zip replaced on disk since it was opened, or opened by the parent of a
    forked process, is opened again."""
    if not container or not zipfile.is_zipfile(container):
        return None
    # the process too: a forked child must not share its parent's file offset
    key, stamp = container, (os.stat(container).st_mtime_ns, os.getpid())
    cache = _open_zips.__dict__.setdefault("zips", {})
    if key in cache and cache[key][0] == stamp:
        return cache[key][1]
    for (_, pid), old in cache.values():
        if pid == os.getpid():
            old.close()
    cache.clear()  # one zip at a time per thread: a job reads one archive
    cache[key] = (stamp, zipfile.ZipFile(container))
    return cache[key][1]


def decode_batch(batch: pd.DataFrame, size: int, limits: InputLimits | None = None,
                 stats: bool = True) -> dict[str, np.ndarray]:
    """Ray Data task: read, decode, check and resize a batch of paths; errors and reject
    reasons become strings ("" = none: a fixed string type whatever the batch holds). With
    ``stats``, the appearance statistics of the out-of-distribution score are computed here
    too (``appearance``), off the thread that runs the forward pass."""
    from pipeline.serving.screening import appearance, decode_screened

    pixels = np.zeros((len(batch), size, size, 3), np.uint8)
    errors: list[str] = []
    rejects: list[str] = []
    container = batch["container"].iloc[0]
    zf = _zip(container)
    for i, path in enumerate(batch["path"]):
        try:
            data = read_bytes(container, path, zf)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            errors.append(f"cannot read file: {exc}")
            rejects.append("")
            continue
        resized, error, rejected = decode_screened(data, size, limits)
        if resized is not None:
            pixels[i] = resized
        errors.append(error or "")
        rejects.append(rejected or "")
    out = {"path": batch["path"].to_numpy(dtype=str), "error": np.array(errors, dtype=str),
           "rejected": np.array(rejects, dtype=str), "pixels": pixels}
    return {**out, "appearance": appearance(pixels)} if stats else out


def decoded_batches(inputs: pd.DataFrame, size: int, limits: InputLimits | None, batch_size: int,
                    pool: Executor, ahead: int, stats: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """``inputs`` decoded by ``pool`` in batches (never across two containers), in order,
    at most ``ahead`` batches decoding while the caller uses the current one (``stats``: as
    :func:`decode_batch`)."""
    parts = (part for start in range(0, len(inputs), batch_size)
             for _, part in inputs.iloc[start:start + batch_size].groupby("container", sort=False))
    decode = partial(decode_batch, size=size, limits=limits, stats=stats)
    pending: deque = deque(pool.submit(decode, part) for _, part in zip(range(ahead), parts))
    while pending:
        batch = pending.popleft().result()
        for part in parts:  # the next one, if any, starts before this one is used
            pending.append(pool.submit(decode, part))
            break
        yield batch
