"""End to end: `dvc repro` of every stage on a small real subset of the NIH sample."""

from __future__ import annotations

import json
import re

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline.data.prepared import PreparedData
from pipeline.project import deep_update, dvc, repro, scaffold
from tests.conftest import CELLS_SMALL_SHA256


def test_deep_update_merges_sections():
    base = {"a": 1, "train": {"epochs": 3, "lr": 0.1}}
    assert deep_update(base, {"train": {"epochs": 1}}) == {"a": 1, "train": {"epochs": 1, "lr": 0.1}}
    assert base["train"]["epochs"] == 3


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_on_real_cells(cells_small, tmp_path):
    project = scaffold(tmp_path / "project", {
        "download": {"sources": {"malaria": {"url": str(cells_small), "sha256": CELLS_SMALL_SHA256}}},
        "prepare": {"image_size": 32},
        "train": {"epochs": 1, "batch_size": 32},
        "evaluate": {"bootstrap": 200, "gradcam_images": 8},
        "score": {"batch_size": 32},
    })
    repro(project)

    assert (project / "data/raw/malaria.zip").stat().st_size == cells_small.stat().st_size
    manifest = pd.read_parquet(project / "data/prepared/manifest.parquet")
    assert len(manifest) == 235  # every cell of the fixture
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    history = pd.read_csv(project / "plots/train/history.csv")
    assert history["epoch"].tolist() == [1] and history["val_loss"].notna().all()
    assert (project / "models/model.pt").is_file()
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert {"accuracy", "roc_auc", "sensitivity", "specificity", "f1", "confusion_matrix"} <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == (manifest["split"] == "test").sum()
    for plot in ("roc.csv", "pr.csv", "confusion.csv", "reliability.csv", "roc.png",
                 "confusion_matrix.png", "gradcam_worst_errors.png"):
        assert (project / "plots/evaluate" / plot).stat().st_size > 0
    report = (project / "reports/evaluate.md").read_text()
    assert re.search(r"^## Patients \(\d+\)$", report, re.M) and "bootstrap over" in report
    assert "| PPV (precision)" in report
    registered = json.loads((project / "models/register.json").read_text())
    assert registered["promoted"] and registered["version"] == "1"
    version = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version("malaria", "1")
    tags = version.tags
    assert {"dataset_id", "git_commit", "run_id", "split_id", "test_roc_auc"} <= set(tags)
    assert len(tags) <= 15 and all(len(v) < 500 for v in tags.values())  # no wall of tags
    assert "is the first model: alias set" in version.description and tags["run_id"] in version.description
    scores = pd.read_parquet(project / "data/scores/predictions.parquet")
    assert len(scores) == metrics["n"] and scores["error"].isna().all()
    assert set(scores["path"]) == set(manifest.loc[manifest["split"] == "test", "path"])
    patients = pd.read_parquet(project / "data/scores/predictions_patients.parquet")
    test_patients = set(manifest.loc[manifest["split"] == "test", "patient_id"])
    assert set(patients["patient_id"]) == test_patients and patients["cells"].sum() == len(scores)

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # not the global URI: later modules use it
    run_id = json.loads((project / "models/train.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert {"train_loss", "val_loss", "val_acc", "test_accuracy", "test_roc_auc"} <= set(run.data.metrics)
    evaluated = json.loads((project / "metrics/evaluate.json").read_text())
    assert run.data.metrics["test_tta"] == float(evaluated["tta"])  # validate scores as evaluate did
    assert run.data.params["train.model"] == "efficientnet_lite0"
    assert run.info.run_name == "workspace/efficientnet_lite0-finetune_all-32px-1ep"
    note = run.data.tags["mlflow.note.content"]
    assert "real images" in note and "Split by patient" in note and "Test figures on" in note
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"malaria-train", "malaria-val"}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"params.yaml", "reports", "plots"} <= artifacts
    assert {"plots/evaluate", "plots/train"} <= {a.path for a in client.list_artifacts(run_id, "plots")}
    description = client.get_registered_model("malaria").description
    assert "## Input contract" in description and "## Validation" in description
    champion = client.get_model_version_by_alias("malaria", "champion")
    assert str(champion.version) == "1"

    # A second repro does no work: every stage is found unchanged and none runs (a stage that
    # ran would rewrite its log and its outputs).
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    written = {p: p.stat().st_mtime_ns for d in ("logs", "models", "metrics", "data/scores")
               for p in (project / d).rglob("*") if p.is_file()}
    out = dvc(project, "repro", capture_output=True, text=True, timeout=600).stdout  # timeout: a hang guard
    assert "Running stage" not in out
    assert sorted(re.findall(r"^Stage '([^']+)' didn't change, skipping$", out, re.M)) == sorted(stages), out
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert {"download", "train", "score"} <= set(stages)
    assert {"train.log", "score.log", "model.pt", "evaluate.json"} <= {p.name for p in written}
    shown = dvc(project, "metrics", "show", "--json", capture_output=True, text=True).stdout
    assert "roc_auc" in shown

    # An output-neutral param (prepare.workers: the same bytes, tested in tests/data) is read by
    # its own stage only: dvc status names prepare, and no stage downstream of it.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["workers"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc(project, "status", "--json", capture_output=True, text=True).stdout)
    default = {stage for stage in status if ":" not in stage}  # not crossval/ or validate/, never run
    assert default == {"prepare"}, status


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
    # run of every stage is test_dvc_repro_runs_every_stage_on_real_cells).
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
