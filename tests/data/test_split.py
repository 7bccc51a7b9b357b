"""split: patient-grouped, label-stratified, on synthetic groups and the real sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.datasets import malaria_patient_id
from pipeline.data.prepare import prepare
from pipeline.data.split import group_split


def test_groups_never_cross_subsets_and_sizes_are_near_target():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(20, 80, 60))
    labels = rng.integers(0, 2, len(groups))
    split = group_split(labels, groups, 0.15, 0.15, seed=3)
    frame = pd.DataFrame({"g": groups, "s": split})
    assert (frame.groupby("g")["s"].nunique() == 1).all()
    share = frame["s"].value_counts(normalize=True)
    assert abs(share["test"] - 0.15) < 0.06 and abs(share["val"] - 0.15) < 0.06


def test_split_is_reproducible_and_seed_dependent():
    groups = np.repeat(np.arange(40), 25)
    labels = np.tile([0, 1], 500)
    a = group_split(labels, groups, 0.2, 0.2, seed=1)
    assert (a == group_split(labels, groups, 0.2, 0.2, seed=1)).all()
    assert (a != group_split(labels, groups, 0.2, 0.2, seed=2)).any()


@pytest.mark.parametrize("name,pid", [
    ("cell_images/Parasitized/C33P1thinF_IMG_20150619_114756a_cell_179.png", "P1"),
    ("cell_images/Uninfected/C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
    ("C182P143NThinF_IMG_20151201_172607_cell_76.png", "P143"),
])
def test_patient_id_from_file_name(name, pid):
    assert malaria_patient_id(name) == pid


def check_patient_disjoint(m, patients: int) -> None:
    assert m["patient_id"].nunique() == patients
    per_patient = m.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1]
    subsets = [set(m.loc[m["split"] == s, "patient_id"]) for s in ("train", "val", "test")]
    assert not (subsets[0] & subsets[1] or subsets[0] & subsets[2] or subsets[1] & subsets[2])
    for s in ("val", "test"):
        part = m[m["split"] == s]
        assert 0.05 < len(part) / len(m) < 0.3
        assert set(part["label"]) == {"Parasitized", "Uninfected"}


def test_real_cells_split_is_patient_disjoint(cells_small, tmp_path):
    result = prepare(cells_small, tmp_path / "prepared", PrepareConfig(image_size=16), "malaria")
    assert len(result.manifest) == 235 and len(result.quarantined) == 0
    check_patient_disjoint(result.manifest, 12)


@pytest.mark.sample
def test_real_sample_split_is_patient_disjoint(sample_zip, tmp_path):
    result = prepare(sample_zip, tmp_path / "prepared", PrepareConfig(image_size=16), "malaria")
    assert len(result.manifest) == 5467 and len(result.skipped) == 2 and len(result.quarantined) == 0
    check_patient_disjoint(result.manifest, 32)
