"""Named, patient-defined subsets of the NIH malaria archive, rebuilt byte for byte by anyone
who has the official ``cell_images.zip`` (``pipeline sample``).

Each subset is a committed patient list (``subsets/<name>.txt``) and a digest of what it must
hold (``subsets/digests.json``: member count and the SHA-256 of its manifest, the sorted
``<sha256>  <member>`` lines). Members are written in name order, stored (PNGs do not
compress), with the timestamps and attributes of the source archive, so two runs give the same bytes
(the 32-patient sample rebuilt from the official archive is the published sample, byte for byte).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.config import UserError
from pipeline.console import progress
from pipeline.data.datasets import get_dataset, is_image_name
from pipeline.files import atomic_path

SUBSETS_DIR = Path(__file__).resolve().parent / "subsets"
DIGESTS = SUBSETS_DIR / "digests.json"
SYSTEM_FILES = ("Thumbs.db",)  # kept where a subset keeps them: the official layout has them


@dataclass(frozen=True)
class Subset:
    """A named subset: its patients, at most ``per_group`` cells per (patient, class) (0: all),
    and whether the class folders' system files come along."""

    name: str
    patients: tuple[str, ...]
    per_group: int = 0
    system_files: bool = False


# What each subset is; the patient lists are files beside this module.
RULES = {"sample": {"system_files": True}, "pool": {}, "pool-selection": {}, "pool-report": {},
         "fixture": {"per_group": 12}}


def subset(name: str) -> Subset:
    """The committed subset ``name`` (one of :data:`RULES`)."""
    if name not in RULES:
        raise UserError(f"unknown subset '{name}'; choose one of {', '.join(RULES)}")
    lines = (SUBSETS_DIR / f"{name}.txt").read_text().splitlines()
    patients = tuple(s.strip() for s in lines if s.strip() and not s.startswith("#"))
    return Subset(name, patients, **RULES[name])


def chosen_members(zf: zipfile.ZipFile, chosen: Subset) -> list[zipfile.ZipInfo]:
    """The source members ``chosen`` keeps, in name order."""
    spec, wanted = get_dataset("malaria"), set(chosen.patients)
    taken: dict[tuple[str, str], int] = {}
    keep = []
    for info in sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename):
        name = info.filename
        if PurePosixPath(name).name in SYSTEM_FILES:
            if chosen.system_files:
                keep.append(info)
            continue
        if not is_image_name(name) or spec.group_of(name) not in wanted:
            continue
        key = (spec.group_of(name), spec.label_of(name))
        taken[key] = taken.get(key, 0) + 1
        if not chosen.per_group or taken[key] <= chosen.per_group:
            keep.append(info)
    found = {spec.group_of(i.filename) for i in keep if is_image_name(i.filename)}
    if found != wanted:
        raise UserError(f"{len(wanted - found)} patients of subset '{chosen.name}' are not in the "
                        f"archive (e.g. {sorted(wanted - found)[:3]}): pass the official "
                        "cell_images.zip, or a subset that holds them")
    return keep


def write_subset(archive: str | Path, out: str | Path, name: str) -> dict[str, object]:
    """Write subset ``name`` of ``archive`` to ``out``; return its digest and whether it matches
    the committed one.

    Raises:
        UserError: the archive lacks a patient of the subset, or the result differs from the
            committed digest (a different archive: nothing is left at ``out``).
    """
    chosen = subset(name)
    lines = []
    with zipfile.ZipFile(archive) as src, atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as dst:
            for info in progress(chosen_members(src, chosen), desc=f"sample {name}", unit="file"):
                data = src.read(info)
                member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                member.external_attr, member.create_system = info.external_attr, info.create_system
                dst.writestr(member, data)
                lines.append(f"{hashlib.sha256(data).hexdigest()}  {info.filename}\n")
        digest = manifest_digest(lines)
        expected = json.loads(DIGESTS.read_text()).get(name)
        if expected is not None and expected != digest:
            raise UserError(f"subset '{name}' of {archive} has {digest['members']} members with manifest "
                            f"{digest['manifest_sha256'][:12]}…, not the committed {expected['members']} / "
                            f"{expected['manifest_sha256'][:12]}…: is this the official cell_images.zip?")
    return {**digest, "matches": expected == digest}


def manifest_digest(lines: list[str]) -> dict[str, object]:
    """Member count and SHA-256 of the sorted ``<sha256>  <member>`` lines."""
    text = "".join(sorted(lines))
    return {"members": len(lines), "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
