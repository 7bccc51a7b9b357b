"""The prepared-data layout: the one reader of the folder ``prepare`` writes.

Layout (one DVC output)::

    manifest.parquet      path, label, patient_id, split, width, height, sha256, index
    {train,val,test}.npy  uint8 arrays (N, S, S, 3) of images resized to S, row
                          ``index`` of the manifest; read with mmap, no decoding
    images/               the original files, for scoring and inspection
    quarantine/           files that failed to decode, with quarantine.csv
    report.json           counts of kept, skipped and quarantined files
    data_card.md          the same, for people

``prepare`` writes it (using the names below); every other module reads it
through :class:`PreparedData`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.split import SPLITS

__all__ = ["SPLITS", "PreparedData", "Split"]

MANIFEST = "manifest.parquet"
IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
REPORT = "report.json"
DATA_CARD = "data_card.md"


def array_file(split: str) -> str:
    """File name of one split's resized image array."""
    return f"{split}.npy"


@dataclass(frozen=True)
class Split:
    """One split: images (memory-mapped), integer labels, patient ids and original paths,
    all in array order."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    paths: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class PreparedData:
    """Read-only view of a prepared folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.root} is not a prepared dataset (no {MANIFEST}); "
                                    "run the prepare stage first (dvc repro prepare)")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """One row per kept image."""
        return pd.read_parquet(self.root / MANIFEST)

    @cached_property
    def class_names(self) -> list[str]:
        """Sorted class names; a label's integer is its position here."""
        return sorted(self.manifest["label"].unique())

    @property
    def image_size(self) -> int:
        """Side of the resized images (read from the array's header, not its data)."""
        return int(np.load(self.root / array_file("train"), mmap_mode="r").shape[1])

    @property
    def images_dir(self) -> Path:
        """Folder of the original files; a manifest ``path`` is relative to it."""
        return self.root / IMAGES_DIR

    @cached_property
    def report(self) -> dict[str, Any]:
        """``report.json``: counts of kept, skipped and quarantined files."""
        return json.loads((self.root / REPORT).read_text())

    @property
    def synthetic(self) -> bool:
        """Whether the images are synthetic demo data (:func:`pipeline.data.synthetic.is_synthetic`)."""
        return bool(self.report.get("synthetic", False))

    def rows(self, split: str) -> pd.DataFrame:
        """Manifest rows of ``split`` in array order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; known: {list(SPLITS)}")
        return self.manifest[self.manifest["split"] == split].sort_values("index")

    def split(self, split: str) -> Split:
        """Images, labels, patient ids and original paths of one split."""
        rows = self.rows(split)
        images = np.load(self.root / array_file(split), mmap_mode="r")
        labels = rows["label"].map({c: i for i, c in enumerate(self.class_names)}).to_numpy(np.int64)
        return Split(split, images, labels, rows["patient_id"].to_numpy(), rows["path"].to_numpy())

    def split_id(self, split: str) -> str:
        """Content hash of a split's images: equal ids mean the same images."""
        hashes = sorted(self.manifest.loc[self.manifest["split"] == split, "sha256"])
        return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]

    def dataset_id(self) -> str:
        """The split ids of train, val and test, joined."""
        return "-".join(self.split_id(s) for s in SPLITS)


def write_resplit(data: PreparedData, splits: pd.Series, dest: str | Path) -> PreparedData:
    """A prepared folder at ``dest`` holding ``data``'s images re-split: ``splits`` maps a
    manifest ``path`` to its new split; rows it leaves out are not in the new folder.

    The arrays are gathered from ``data``'s (no decoding) and the original files are a
    symlink, so a cross-validation fold is a prepared folder like any other: the normal
    training and prediction code reads it.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = data.manifest[data.manifest["path"].isin(splits.index)].copy()
    rows["old_split"], rows["old_index"] = rows["split"], rows["index"]
    rows["split"] = rows["path"].map(splits)
    parts = []
    for split in SPLITS:
        part = rows[rows["split"] == split].sort_values(["old_split", "old_index"]).copy()
        images = [np.load(data.root / array_file(s), mmap_mode="r")[g["old_index"].to_numpy()]
                  for s, g in part.groupby("old_split", sort=True)]
        shape = (0, data.image_size, data.image_size, 3)
        np.save(dest / array_file(split), np.concatenate(images) if images else np.zeros(shape, np.uint8))
        part["index"] = np.arange(len(part))
        parts.append(part.drop(columns=["old_split", "old_index"]))
    pd.concat(parts, ignore_index=True).to_parquet(dest / MANIFEST, index=False)
    (dest / REPORT).write_text((data.root / REPORT).read_text())
    if not (dest / IMAGES_DIR).exists():
        (dest / IMAGES_DIR).symlink_to(data.images_dir.resolve(), target_is_directory=True)
    return PreparedData(dest)
