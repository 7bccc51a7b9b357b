"""Switching the dataset is one param: an 8-class MedMNIST file through every stage, class
folders of real cells through the policy. (The 2-class run of every stage, and what each
stage records: tests/test_demo.py.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.data.prepared import PreparedData
from pipeline.project import deep_update, repro, scaffold


def test_deep_update_merges_sections():
    base = {"a": 1, "train": {"epochs": 3, "lr": 0.1}}
    assert deep_update(base, {"train": {"epochs": 1}}) == {"a": 1, "train": {"epochs": 1, "lr": 0.1}}
    assert base["train"]["epochs"] == 3


def _relayout_sample(cells_small, dest, every: int = 1):
    """A zip of real cells re-laid out as <class>/<file>, plus a path,group CSV of patients."""
    import zipfile

    from pipeline.data.datasets import malaria_patient_id

    rows = []
    with zipfile.ZipFile(cells_small) as src, zipfile.ZipFile(dest, "w") as out:
        names = sorted(n for n in src.namelist() if n.endswith(".png"))[::every]
        for name in names:
            cls, file = name.split("/")[-2:]
            out.writestr(f"{cls}/{file}", src.read(name))
            rows.append({"path": f"{cls}/{file}", "group": malaria_patient_id(file)})
    groups = dest.with_suffix(".csv")
    pd.DataFrame(rows).to_csv(groups, index=False)
    return dest, groups


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["bloodmnist", "imagefolder"])
def test_switching_dataset_is_one_param(dataset, cells_small, tmp_path):
    from pipeline.data.synthetic import make_medmnist_npz

    if dataset == "bloodmnist":
        source = make_medmnist_npz(tmp_path / "bloodmnist.npz", n_classes=8, counts=(320, 64, 96))
        prepare = {"image_size": 32}
        n_classes = 8
    else:
        source, groups = _relayout_sample(cells_small, tmp_path / "cells_by_class.zip")
        prepare = {"image_size": 32, "groups_csv": str(groups)}
        n_classes = 2
    project = scaffold(tmp_path / "project", {
        "dataset": dataset,
        "download": {"sources": {dataset: {"url": str(source), "sha256": "", "md5": ""}}},
        "prepare": prepare, "augment": {"preset": "strong"},
        "train": {"epochs": 1, "batch_size": 32},
        # one view: TTA's 8x inference is the subject of the 2-class run, not of the switch
        "evaluate": {"bootstrap": 100, "gradcam_images": 4, "tta": False}, "score": {"tta": False},
    })
    # The stages after augment read only the prepared layout, whichever dataset made it: the
    # 8-class MedMNIST file runs all of them, the class folders up to the policy (the 2-class
    # run of every stage is the demo's, tests/test_demo.py).
    repro(project, *([] if dataset == "bloodmnist" else ["augment"]))
    if dataset == "bloodmnist":
        metrics = json.loads((project / "metrics/evaluate.json").read_text())
        assert len(metrics["confusion_matrix"]) == n_classes and len(metrics["per_class"]) == n_classes
        assert 0 <= metrics["roc_auc"] <= 1
        registered = json.loads((project / "models/register.json").read_text())
        assert registered["name"] == dataset and registered["promoted"]
    else:
        assert PreparedData(project / "data/prepared").class_names == ["Parasitized", "Uninfected"]
    assert "HEStain" in (project / "models/augment.yaml").read_text()
    assert (project / "plots/augment/preview.png").stat().st_size > 0
    card = (project / "reports/data_card.md").read_text()
    assert f"Data card: {dataset}" in card
    if dataset == "imagefolder":
        manifest = pd.read_parquet(project / "data/prepared/manifest.parquet")
        assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
