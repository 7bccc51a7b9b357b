"""Dataset registry: how to find the label and the patient of each image."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})
# Files an operating system leaves beside images: the only ones scoring skips (named).
SYSTEM_FILES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})

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


def file_stem(path: str) -> str:
    """Group of an image with no patient information: the image itself."""
    return PurePosixPath(path).stem


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset's archive maps to labelled, grouped images.

    ``kind`` is ``"archive"`` (a zip of ``<class>/<image>`` files, split here by
    group) or ``"npz"`` (MedMNIST arrays with their official split kept as is).
    ``has_patients`` says whether ``group_of`` reads a patient from a file name;
    without it every image is its own group.
    """

    name: str
    kind: str = "archive"
    label_of: Callable[[str], str] = folder_label
    group_of: Callable[[str], str] = file_stem
    has_patients: bool = False
    class_names: tuple[str, ...] = ()  # npz: label index -> name
    licence: str = ""


_MEDMNIST_CLASSES = {
    "bloodmnist": ("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"),
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"),
}
_MEDMNIST_LICENCE = {"bloodmnist": "CC BY 4.0", "pathmnist": "CC BY 4.0",
                     "dermamnist": "CC BY-NC 4.0 (non-commercial use only)"}

DATASETS: dict[str, DatasetSpec] = {
    "malaria": DatasetSpec("malaria", "archive", folder_label, malaria_patient_id, has_patients=True,
                           licence="public domain (U.S. National Library of Medicine)"),
    "imagefolder": DatasetSpec("imagefolder", "archive", folder_label, file_stem, has_patients=False),
    **{f"{name}{suffix}": DatasetSpec(f"{name}{suffix}", "npz", class_names=classes,
                                      licence=_MEDMNIST_LICENCE[name])
       for name, classes in _MEDMNIST_CLASSES.items() for suffix in ("", "_64", "_128", "_224")},
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


def is_system_file(path: str) -> bool:
    """Whether a file is one an operating system leaves beside images (``Thumbs.db``,
    ``.DS_Store``, ``desktop.ini``, ``__MACOSX/``, ``._`` resource forks)."""
    p = PurePosixPath(path.replace("\\", "/"))
    return p.name.lower() in SYSTEM_FILES or p.name.startswith("._") or "__MACOSX" in p.parts
