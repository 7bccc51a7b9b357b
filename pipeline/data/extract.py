"""Reading a dataset archive's members: decoded, resized and hashed once, in this process or a
pool of forked workers, results in archive order (the same bytes whatever the worker count);
MedMNIST ``.npz`` files with their official split."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import zipfile
from pathlib import Path

import numpy as np

from pipeline.console import progress
from pipeline.data.archive import checked_members, nested_archives, safe_member_path
from pipeline.data.datasets import DatasetSpec, is_image_name
from pipeline.data.images import ImageDecodeError, load_rgb, resize
from pipeline.data.prepared import IMAGES_DIR, QUARANTINE_DIR, SPLITS

log = logging.getLogger(__name__)


def extract_npz(archive: Path, root: Path, spec: DatasetSpec, size: int):
    """MedMNIST ``.npz``: official split, class names from the registry, PNG copies of the images."""
    from PIL import Image

    records: list[dict] = []
    pixels: list[np.ndarray] = []
    try:
        data = np.load(archive)
        arrays = {s: (data[f"{s}_images"], data[f"{s}_labels"].reshape(-1)) for s in SPLITS}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{archive} is not a MedMNIST .npz with train/val/test_images and "
                         f"_labels arrays ({exc})") from None
    for split, (images, labels) in arrays.items():
        for i, (img, label) in enumerate(progress(list(zip(images, labels)), desc=f"prepare {split}",
                                              unit="img")):
            rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
            name = spec.class_names[int(label)]
            path = f"{split}/{name.replace('/', '_')}/{spec.name}_{split}_{i:06d}.png"
            dest = root / IMAGES_DIR / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(dest, format="PNG")
            pixels.append(resize(rgb, size))
            records.append({"row": len(records), "path": path, "label": name,
                            "patient_id": f"{split}-{i}", "split": split,
                            "width": rgb.shape[1], "height": rgb.shape[0],
                            "sha256": hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()})
    return records, pixels, [], []


def extract_zip(
    archive: Path, root: Path, spec: DatasetSpec, size: int, workers: int = 0
) -> tuple[list[dict], list[np.ndarray], list[str], list[tuple[str, str]]]:
    """Extract images, decode and resize each once, sort them into kept / skipped / bad.

    ``workers`` processes (0: one per core) each read, decode, resize, hash and write
    their share of the members; results come back in archive order, so the outputs are
    the same bytes whatever the number of workers.
    """
    records: list[dict] = []
    pixels: list[np.ndarray] = []
    bad: list[tuple[str, str]] = []
    members = checked_members(archive, root / IMAGES_DIR)
    skipped = [m.filename for m in members if not is_image_name(m.filename)]
    names = [m.filename for m in members if is_image_name(m.filename)]
    with _members(archive, root, spec, size, workers, len(names)) as read:
        for name, got in progress(zip(names, read(names)), total=len(names), desc="prepare",
                                  unit="img"):
            if len(got) == 1:
                bad.append((name, got[0]))
                continue
            label, group, (height, width), resized, digest = got
            pixels.append(resized)
            records.append({"row": len(records), "path": name, "label": label, "patient_id": group,
                            "width": width, "height": height, "sha256": digest})
    if skipped:
        log.info("skipped %d non-image files: %s", len(skipped), skipped[:5])
    for nested in nested_archives(skipped):
        log.warning("skipped the archive '%s' inside the archive: extract it to use its images", nested)
    if bad:
        log.warning("quarantined %d unreadable images, see quarantine/quarantine.csv", len(bad))
    return records, pixels, skipped, bad


class _MemberReader:
    """Reads one archive member, decodes, resizes and hashes it, and writes the original
    file to the images folder, or to quarantine with the reason (unreadable, or a name
    without label or patient)."""

    def __init__(self, archive: Path, root: Path, spec: DatasetSpec, size: int):
        self.zf, self.root, self.spec, self.size = zipfile.ZipFile(archive), root, spec, size

    def __call__(self, name: str) -> tuple:
        data = self.zf.read(name)
        try:
            img = load_rgb(data)
            label, group = self.spec.label_of(name), self.spec.group_of(name)
        except (ImageDecodeError, ValueError) as exc:
            _write(safe_member_path(name, self.root / QUARANTINE_DIR), data)
            return (str(exc),)
        _write(safe_member_path(name, self.root / IMAGES_DIR), data)
        return label, group, img.shape[:2], resize(img, self.size), hashlib.sha256(data).hexdigest()


def _write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


_READER: _MemberReader | None = None  # a pool worker's own reader (its own zip handle)


def _start_reader(*args) -> None:
    global _READER
    _READER = _MemberReader(*args)


def _read(name: str) -> tuple:
    return _READER(name)


PER_WORKER = 500  # fewer images a process than this: not worth starting it


@contextlib.contextmanager
def _members(archive: Path, root: Path, spec: DatasetSpec, size: int, workers: int, n_items: int):
    """``read(names)``: each member read by a :class:`_MemberReader`, results in order; in
    this process, or in ``workers`` forked processes (0: one per core; at most one per
    PER_WORKER members, as a process costs time to start)."""
    n = min(workers or os.cpu_count() or 1, max(1, n_items // PER_WORKER))
    args = (archive, root, spec, size)
    if n == 1 or "fork" not in multiprocessing.get_all_start_methods():
        # (spawn would re-run a caller's script without a __main__ guard, and pickle the spec)
        reader = _MemberReader(*args)
        yield lambda names: map(reader, names)
        reader.zf.close()
        return
    with multiprocessing.get_context("fork").Pool(n, initializer=_start_reader, initargs=args) as pool:
        yield lambda names: pool.imap(_read, names, chunksize=64)
        pool.close()  # the workers end on their own; the with's terminate() would SIGTERM them
        pool.join()   # (a caller that imported Ray gets a stack trace printed for each)
