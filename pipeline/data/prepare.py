"""Extract, validate, split and resize a dataset archive into training arrays.

Writes the folder whose layout :mod:`pipeline.data.prepared` describes and reads.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline.config import PrepareConfig
from pipeline.data import datacard
from pipeline.data.archive import (
    check_archive,
    check_classes,
    corrupt_archive,
    no_images_error,
)
from pipeline.data.datasets import DatasetSpec, get_dataset
from pipeline.data.extract import extract_npz, extract_zip
from pipeline.data.prepared import (
    DATA_CARD,
    IMAGES_DIR,
    MANIFEST,
    QUARANTINE_DIR,
    REPORT,
    SPLITS,
    array_file,
)
from pipeline.data.split import group_split
from pipeline.data.synthetic import is_synthetic
from pipeline.files import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    manifest: pd.DataFrame
    class_names: list[str]
    skipped: list[str]
    quarantined: pd.DataFrame


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


def _build(archive: Path, tmp: Path, cfg: PrepareConfig, spec: DatasetSpec) -> PrepareResult:
    """Everything :func:`prepare` writes, into ``tmp``."""
    (tmp / IMAGES_DIR).mkdir(parents=True)
    try:
        if spec.kind == "npz":
            records, pixels, skipped, bad = extract_npz(archive, tmp, spec, cfg.image_size)
        else:
            records, pixels, skipped, bad = extract_zip(archive, tmp, spec, cfg.image_size, cfg.workers)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # a member's data, read at extraction
        raise corrupt_archive(archive, exc) from None
    if not records:
        raise no_images_error(archive, skipped)
    manifest = pd.DataFrame(records)
    if cfg.groups_csv:
        manifest["patient_id"] = _groups_from_csv(manifest["path"], Path(cfg.groups_csv))
    if spec.kind != "npz":  # an official split is kept as it is
        check_classes(manifest["label"], manifest["patient_id"], archive)
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
