"""Archive safety: what ``prepare`` checks before it extracts anything (a zip, its size and
compression ratio, member paths that would escape the folder, symbolic links)."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pipeline.config import PrepareConfig, UserError

if TYPE_CHECKING:
    import pandas as pd


class ArchiveError(UserError, ValueError):
    """The archive cannot be used as it is: not a zip, truncated, empty, or too large."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the target folder."""


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
        raise corrupt_archive(archive, exc) from None
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


def corrupt_archive(archive: Path, exc: BaseException) -> ArchiveError:
    return ArchiveError(f"{archive} is truncated or corrupt ({exc}): download it again")


NESTED_ARCHIVES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")


def checked_members(archive: Path, root: Path) -> list[zipfile.ZipInfo]:
    """The archive's file members, each path checked before anything is written: one that
    would escape ``root``, a symbolic link, or two members of one name (the second would
    silently replace the first) refuses the whole archive."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
    names: dict[str, int] = {}
    for m in members:
        safe_member_path(m.filename, root)
        if stat.S_ISLNK(m.external_attr >> 16):
            raise UnsafeArchiveError(f"archive member '{m.filename}' is a symbolic link")
        names[m.filename] = names.get(m.filename, 0) + 1
    twice = sorted(n for n, count in names.items() if count > 1)
    if twice:
        raise ArchiveError(f"{archive} holds {len(twice)} member name(s) more than once (e.g. "
                           f"'{twice[0]}'): one would silently replace the other; rebuild the zip "
                           "with unique names")
    return members


def nested_archives(names: list[str]) -> list[str]:
    """Members that are archives themselves: never read (extract them first)."""
    return [n for n in names if PurePosixPath(n).suffix.lower() in NESTED_ARCHIVES]


def no_images_error(archive: Path, names: list[str]) -> ArchiveError:
    """The error for an archive with no readable image, naming a nested archive if there is one."""
    nested = nested_archives(names)
    if nested:
        return ArchiveError(f"no readable images found in {archive}, which holds the archive "
                            f"'{nested[0]}'{f' and {len(nested) - 1} more' if len(nested) > 1 else ''}: "
                            "archives inside the archive are not read; extract it and point "
                            "download.sources at it")
    return ArchiveError(f"no readable images found in {archive}")


def check_classes(labels: "pd.Series", groups: "pd.Series", archive: Path) -> None:
    """Refuse data a patient-grouped split cannot use: fewer than two classes, or a class with
    fewer than three patients (one each for train, val and test)."""
    classes = sorted(labels.unique())
    if len(classes) < 2:
        raise ArchiveError(f"{archive} holds one class ({classes[0]!r}, {len(labels)} images): a "
                           "classifier needs at least two class folders")
    patients = groups.groupby(labels).nunique()
    few = {c: int(n) for c, n in patients.items() if n < 3}
    if few:
        shown = ", ".join(f"{c!r} ({n})" for c, n in few.items())
        raise ArchiveError(f"{archive}: class {shown} has fewer than 3 patients, so the train, "
                           "validation and test splits cannot each hold one patient of every "
                           "class; add patients, or merge the class")
