"""Dataset registry: how to find the label and the patient of each image."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

_MALARIA_ID = re.compile(r"^C(?P<slide>\d+)(?:P(?P<patient>\d+))?", re.IGNORECASE)


def malaria_patient_id(path: str) -> str:
    """Patient of a NIH malaria cell image, from its file name.

    ``C101P62ThinF_IMG_..._cell_61.png`` belongs to patient ``P62``. Healthy
    donors' slides carry no ``P<n>`` part (``C3thin_f_IMG_...``); they are grouped
    by slide (``C3``).
    """
    name = PurePosixPath(path).name
    m = _MALARIA_ID.match(name)
    if m is None:
        raise ValueError(f"cannot read a patient id from malaria file name '{name}'")
    if m.group("patient"):
        return f"P{int(m.group('patient'))}"
    return f"C{int(m.group('slide'))}"


def folder_label(path: str) -> str:
    """Class of an image stored as ``.../<class>/<file>``."""
    parts = PurePosixPath(path).parts
    if len(parts) < 2:
        raise ValueError(f"image '{path}' is not inside a class folder")
    return parts[-2]


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset's archive maps to labelled, grouped images."""

    name: str
    label_of: Callable[[str], str]
    group_of: Callable[[str], str]
    positive_class: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "malaria": DatasetSpec("malaria", folder_label, malaria_patient_id, "Parasitized"),
}


def get_dataset(name: str) -> DatasetSpec:
    """Look up a dataset by name, with a clear error listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; known: {sorted(DATASETS)}") from None


def is_image_name(path: str) -> bool:
    """Whether a file name looks like an image (``Thumbs.db`` and friends do not)."""
    p = PurePosixPath(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._") and "__MACOSX" not in p.parts
