"""datasets: the registry, MedMNIST .npz and imagefolder preparation, data card, duplicates."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.datasets import DATASETS, get_dataset
from pipeline.data.prepare import prepare
from pipeline.data.prepared import PreparedData
from pipeline.data.synthetic import (
    make_imagefolder_zip,
    make_medmnist_npz,
    png_bytes,
    synthetic_cell,
)


def test_registry_has_every_dataset_and_a_clear_error():
    for name in ("malaria", "imagefolder", "bloodmnist", "pathmnist", "dermamnist", "bloodmnist_224"):
        assert name in DATASETS
    assert len(get_dataset("pathmnist").class_names) == 9
    assert "NC" in get_dataset("dermamnist").licence
    with pytest.raises(ValueError, match="known"):
        get_dataset("chestxray")


@pytest.mark.parametrize("grey", [False, True])
def test_medmnist_npz_keeps_the_official_split(tmp_path, grey):
    npz = make_medmnist_npz(tmp_path / "bloodmnist.zip", n_classes=8, counts=(80, 16, 24), grey=grey)
    with np.load(npz) as data:
        assert data["train_images"].shape[1:] == ((28, 28) if grey else (28, 28, 3))
        assert data["train_labels"].shape == (80, 1)
        official = {s: data[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")}
    result = prepare(npz, tmp_path / "prepared", PrepareConfig(image_size=32), "bloodmnist")
    counts = result.manifest["split"].value_counts().to_dict()
    assert counts == {"train": 80, "val": 16, "test": 24}
    names = get_dataset("bloodmnist").class_names
    data = PreparedData(tmp_path / "prepared")
    images, labels, classes = data.split("test").images, data.split("test").labels, data.class_names
    assert images.shape == (24, 32, 32, 3)
    assert sorted(np.array(classes)[labels]) == sorted(np.array(names)[official["test"]])
    first = result.manifest[result.manifest["split"] == "test"].iloc[0]
    assert (tmp_path / "prepared" / "images" / first["path"]).is_file()


def test_imagefolder_with_group_csv_keeps_groups_together(tmp_path):
    archive = make_imagefolder_zip(tmp_path / "folder.zip", n_classes=3, per_class=30)
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
    groups = pd.DataFrame({"path": names, "group": [f"g{i % 15}" for i in range(len(names))]})
    groups.to_csv(tmp_path / "groups.csv", index=False)
    result = prepare(archive, tmp_path / "prepared",
                     PrepareConfig(image_size=24, groups_csv=str(tmp_path / "groups.csv")), "imagefolder")
    m = result.manifest
    assert set(m["label"]) == {"class_0", "class_1", "class_2"}
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()
    assert m["patient_id"].nunique() == 15


def test_missing_group_is_an_error(tmp_path):
    archive = make_imagefolder_zip(tmp_path / "folder.zip", n_classes=2, per_class=5)
    pd.DataFrame({"path": ["class_0/img_0000.png"], "group": ["a"]}).to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(ValueError, match="have no group"):
        prepare(archive, tmp_path / "p", PrepareConfig(groups_csv=str(tmp_path / "g.csv")), "imagefolder")


@pytest.mark.parametrize("drop", [False, True])
def test_cross_split_duplicates_are_flagged_or_dropped(tmp_path, drop):
    rng = np.random.default_rng(0)
    same = png_bytes(synthetic_cell(rng, True, 40))
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in range(10):  # the same image under every patient: it must cross splits
            zf.writestr(f"cell_images/Parasitized/C{p}P{p}_dup.png", same)
            for i in range(6):
                label = "Parasitized" if i % 2 else "Uninfected"
                zf.writestr(f"cell_images/{label}/C{p}P{p}_{i}.png",
                            png_bytes(synthetic_cell(rng, i % 2 == 1, 40)))
    result = prepare(archive, tmp_path / "prepared", PrepareConfig(image_size=16, drop_duplicates=drop),
                     "malaria")
    card = (tmp_path / "prepared" / "data_card.md").read_text()
    assert "Identical images in more than one split (1)" in card
    dups = result.manifest[result.manifest["path"].str.endswith("_dup.png")]
    if drop:
        assert dups["split"].nunique() == 1
        assert len(result.manifest) < 70
    else:
        assert dups["split"].nunique() > 1 and len(result.manifest) == 70


def test_data_card_lists_counts_groups_sizes_and_quarantine(prepared_synthetic):
    card = (prepared_synthetic / "data_card.md").read_text()
    for part in ("Images per class and split", "Patients / groups per split", "Original image size",
                 "Quarantined unreadable images (2)", "Thumbs.db", "truncated"):
        assert part in card, part
