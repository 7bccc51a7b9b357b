"""Extract, validate, split and resize a dataset archive into training arrays.

Writes the folder whose layout :mod:`pipeline.prepared` describes and reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import multiprocessing
import os
import hashlib
import logging
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline import datacard
from pipeline.console import progress
from pipeline.synthetic import is_synthetic
from pipeline.config import PrepareConfig, UserError
from pipeline.datasets import DatasetSpec, get_dataset, is_image_name
from pipeline.images import ImageDecodeError, load_rgb, resize
from pipeline.prepared import (DATA_CARD, IMAGES_DIR, MANIFEST, QUARANTINE_DIR, REPORT, SPLITS,
                               array_file)
from pipeline.split import group_split
from pipeline.utils import write_json

log = logging.getLogger(__name__)


class ArchiveError(UserError, ValueError):
    """The archive cannot be used as it is: not a zip, truncated, empty, or too large."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the target folder."""


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    manifest: pd.DataFrame
    class_names: list[str]
    skipped: list[str]
    quarantined: pd.DataFrame


def safe_member_path(name: str, root: Path) -> Path:
    """Where archive member ``name`` goes under ``root``; refuse any escape.

    A lexical check is enough: ``root`` is a fresh folder this stage made, and symbolic
    link members are refused, so no link inside it can redirect a path (and no per-member
    ``resolve()``, which cost a second of system calls on the sample).
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    if (pure.is_absolute() or ".." in pure.parts or not pure.parts
            or ":" in pure.parts[0] or name.startswith("\\")):
        raise UnsafeArchiveError(f"archive member '{name}' would be written outside {root}")
    return root / pure


def prepare(archive: str | Path, out_dir: str | Path, cfg: PrepareConfig, dataset: str) -> PrepareResult:
    """Turn ``archive`` into a validated, split, resized dataset under ``out_dir``.

    The folder is built beside ``out_dir`` and swapped in at the end, so a failure
    leaves no half-written output.
    """
    spec = get_dataset(dataset)
    if not Path(archive).is_file():
        raise FileNotFoundError(f"archive {archive} not found: run the download stage first "
                                "(dvc repro download)")
    check_archive(Path(archive), cfg)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _build(Path(archive), tmp, cfg, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves nothing behind
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("prepared %d images (%d skipped, %d quarantined) in %s",
             len(result.manifest), len(result.skipped), len(result.quarantined), out_dir)
    return dataclasses.replace(result, out_dir=out_dir)


def check_archive(archive: Path, cfg: PrepareConfig) -> None:
    """Refuse, before extracting anything, an archive that is not a readable zip, is empty,
    or declares more than ``cfg.max_archive_bytes`` or a compression ratio past
    ``cfg.max_compression_ratio`` (a zip bomb)."""
    if not zipfile.is_zipfile(archive):
        with open(archive, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's start without its end
                raise ArchiveError(f"{archive} is a truncated zip (its end is missing): download "
                                   "it again")
        raise ArchiveError(f"{archive} is not a zip archive: download it again or point "
                           "download.sources at a .zip")
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, EOFError) as exc:
        raise _corrupt(archive, exc) from None
    if not members:
        raise ArchiveError(f"{archive} is an empty zip: it holds no files")
    total = sum(m.file_size for m in members)
    if total > cfg.max_archive_bytes:
        raise ArchiveError(f"{archive} declares {total:,} bytes uncompressed, more than "
                           f"prepare.max_archive_bytes ({cfg.max_archive_bytes:,}); refused before "
                           "extracting (raise the limit if the archive is genuine)")
    worst = max(members, key=lambda m: m.file_size / max(m.compress_size, 1))
    ratio = worst.file_size / max(worst.compress_size, 1)
    if ratio > cfg.max_compression_ratio:
        raise ArchiveError(f"{archive}: member '{worst.filename}' expands {ratio:,.0f}x, more than "
                           f"prepare.max_compression_ratio ({cfg.max_compression_ratio:g}x); a "
                           "likely zip bomb, refused before extracting (uncompressed BMP/TIFF cells "
                           "can compress that well: raise the limit if the archive is genuine)")


def _corrupt(archive: Path, exc: BaseException) -> ArchiveError:
    return ArchiveError(f"{archive} is truncated or corrupt ({exc}): download it again")


def _build(archive: Path, tmp: Path, cfg: PrepareConfig, spec: DatasetSpec) -> PrepareResult:
    """Everything :func:`prepare` writes, into ``tmp``."""
    (tmp / IMAGES_DIR).mkdir(parents=True)
    try:
        if spec.kind == "npz":
            records, pixels, skipped, bad = _extract_npz(archive, tmp, spec, cfg.image_size)
        else:
            records, pixels, skipped, bad = _extract(archive, tmp, spec, cfg.image_size, cfg.workers)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # a member's data, read at extraction
        raise _corrupt(archive, exc) from None
    if not records:
        raise ValueError(f"no readable images found in {archive}")
    manifest = pd.DataFrame(records)
    if cfg.groups_csv:
        manifest["patient_id"] = _groups_from_csv(manifest["path"], Path(cfg.groups_csv))
    if cfg.max_images and len(manifest) > cfg.max_images:
        manifest = manifest.sample(n=cfg.max_images, random_state=cfg.seed)
    manifest = manifest.sort_values("path").reset_index(drop=True)
    if "split" not in manifest:  # official splits (MedMNIST) are kept as they are
        manifest["split"] = group_split(
            manifest["label"].to_numpy(), manifest["patient_id"].to_numpy(),
            cfg.val_ratio, cfg.test_ratio, cfg.seed,
        )
    manifest, duplicates = _cross_split_duplicates(manifest, cfg.drop_duplicates)
    manifest = _write_arrays(manifest, pixels, tmp)
    class_names = sorted(manifest["label"].unique())
    quarantined = pd.DataFrame(bad, columns=["path", "reason"])
    quarantined.to_csv(tmp / QUARANTINE_DIR / "quarantine.csv", index=False) if bad else None
    manifest.to_parquet(tmp / MANIFEST, index=False)
    report = datacard.report(manifest, class_names, skipped, quarantined, duplicates, cfg)
    report["synthetic"] = is_synthetic(archive)
    write_json(tmp / REPORT, report)
    (tmp / DATA_CARD).write_text(datacard.data_card(spec, manifest, report, duplicates))
    return PrepareResult(tmp, manifest, class_names, skipped, quarantined)


def _groups_from_csv(paths: pd.Series, csv: Path) -> pd.Series:
    """Group ids from a CSV of ``path,group`` (full archive path or file name)."""
    table = pd.read_csv(csv)
    if not {"path", "group"} <= set(table.columns):
        raise ValueError(f"{csv} needs the columns 'path' and 'group'")
    by_path = dict(zip(table["path"].astype(str), table["group"].astype(str)))
    by_name = {PurePosixPath(k).name: v for k, v in by_path.items()}
    groups = [by_path.get(p, by_name.get(PurePosixPath(p).name)) for p in paths]
    missing = [p for p, g in zip(paths, groups) if g is None]
    if missing:
        raise ValueError(f"{len(missing)} images have no group in {csv}, e.g. {missing[:3]}")
    return pd.Series(groups, index=paths.index)


def _cross_split_duplicates(manifest: pd.DataFrame, drop: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images whose exact bytes occur in more than one split; dropped from the later split if asked."""
    order = {s: i for i, s in enumerate(SPLITS)}
    spread = manifest.groupby("sha256")["split"].nunique()
    dup = manifest[manifest["sha256"].isin(spread[spread > 1].index)].copy()
    dup = dup.sort_values(["sha256", "split"], key=lambda c: c.map(order) if c.name == "split" else c)
    if drop and len(dup):
        later = dup[dup.duplicated("sha256", keep="first")]
        manifest = manifest.drop(index=later.index)
        log.warning("dropped %d images that duplicate an image of an earlier split", len(later))
    elif len(dup):
        log.warning("%d images occur in more than one split (prepare.drop_duplicates keeps them)", len(dup))
    return manifest.reset_index(drop=True), dup[["path", "split", "sha256"]]


def _extract_npz(archive: Path, root: Path, spec: DatasetSpec, size: int):
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


def _extract(
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
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
    for m in members:  # check every path before writing anything
        safe_member_path(m.filename, root / IMAGES_DIR)
        if stat.S_ISLNK(m.external_attr >> 16):
            raise UnsafeArchiveError(f"archive member '{m.filename}' is a symbolic link")
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


def _write_arrays(manifest: pd.DataFrame, pixels: list[np.ndarray], root: Path) -> pd.DataFrame:
    """Store each split's resized images as one ``.npy``; ``index`` is the array row."""
    manifest = manifest.copy()
    manifest["index"] = -1
    for split in SPLITS:
        rows = np.flatnonzero(manifest["split"].to_numpy() == split)
        stack = [pixels[r] for r in manifest["row"].to_numpy()[rows]]
        _save_array(root / array_file(split),
                    np.stack(stack) if stack else np.zeros((0, *pixels[0].shape), np.uint8))
        manifest.loc[rows, "index"] = np.arange(len(rows))
    return manifest.drop(columns="row")


def _save_array(path: Path, array: np.ndarray) -> None:
    """``np.save``, with numpy's errno-less short write turned into the disk-full error it is."""
    try:
        np.save(path, array)
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise OSError(errno.ENOSPC, f"short write to {path} ({exc})") from None
