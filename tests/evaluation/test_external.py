"""external: validation of a registered model on an archive of new patients (the report, CIs,
rejected and unreadable cells counted as errors, training patients refused or left out, the
MLflow run and the version's description) and paired comparisons of two models."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.config import UserError, ValidateConfig
from pipeline.data.datasets import get_dataset
from pipeline.data.synthetic import png_bytes
from pipeline.evaluation.external import paired_difference, validate
from pipeline.evaluation.external_report import POINTS, REPORTED
from pipeline.serving.registry import TRAIN_GROUPS_ARTIFACT
from tests.conftest import POOL_ENV

NAME, POSITIVE, THRESHOLD = "external-test", "Parasitized", 0.3
SPEC = get_dataset("malaria")
# Two of the fixture's 12 patients (and one elsewhere) trained the model under test.
TRAINED = ["C3", "P62", "P999"]
CFG = ValidateConfig(bootstrap=200)


@pytest.fixture(scope="module")
def versions(tracking_uri, reject_checkpoint) -> dict[str, str]:
    """Three versions of one registered model with the reject option: ``with_record`` trained on
    :data:`TRAINED` (its run records them and an operating point), ``without_record`` records
    neither, ``with_tta`` is ``with_record`` evaluated with test-time augmentation."""
    from pipeline.data.synthetic import synthetic_cell
    from pipeline.serving.pyfunc import log_model

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("external-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("external-tests")
    example = synthetic_cell(np.random.default_rng(0), True, 64)
    out = {}
    for key in ("with_record", "without_record", "with_tta"):
        with mlflow.start_run(experiment_id=experiment_id) as run:
            uri = log_model(reject_checkpoint, example, (POSITIVE, "Uninfected"))
            if key != "without_record":
                mlflow.log_metric("test_operating_threshold", THRESHOLD)
                mlflow.log_dict({"groups": TRAINED}, TRAIN_GROUPS_ARTIFACT)
            if key == "with_tta":  # as evaluate logs evaluate.tta: true
                mlflow.log_metric("test_tta", 1.0)
        out[key] = str(mlflow.register_model(uri, NAME).version)
        out[f"{key}_experiment"] = run.info.experiment_id
    client.update_model_version(NAME, out["with_record"], description="Registered by the test.")
    return out


@pytest.fixture(scope="module")
def archive(cells_small, tmp_path_factory) -> Path:
    """The fixture's real cells, plus a blank cell (rejected by the input checks), an unreadable
    one and a text file (not an image: skipped)."""
    path = tmp_path_factory.mktemp("external") / "new_patients.zip"
    with zipfile.ZipFile(cells_small) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("cell_images/Parasitized/C99P35ThinF_IMG_blank_cell_1.png",
                     png_bytes(np.full((120, 120, 3), 200, np.uint8)))
        dst.writestr("cell_images/Uninfected/C99P35ThinF_IMG_broken_cell_2.png", b"not a png")
        dst.writestr("cell_images/README.txt", b"cells of new patients")
    return path


def run_validate(archive: Path, version: str, out: Path, **change) -> object:
    cfg = ValidateConfig(**{**vars(CFG), "archive": str(archive), **change})
    return validate(cfg, f"models:/{NAME}/{version}", out, SPEC, POSITIVE, 0.1)


def check_intervals(figures: dict) -> None:
    for level in ("cells", "patients"):
        for point in POINTS:
            for metric in REPORTED:
                r = figures[level][point][metric]
                if None not in r.values():
                    assert r["ci_low"] <= r["value"] <= r["ci_high"], (level, point, metric, r)
    assert figures["cells"]["threshold_0.5"]["accuracy"]["value"] is not None


def test_validate_reports_figures_counts_unanswered_cells_as_errors_and_records_the_run(
        versions, archive, tmp_path):
    version = versions["with_record"]
    result = run_validate(archive, version, tmp_path / "external", exclude_overlap=True)
    out = tmp_path / "external"
    for name in ("external.md", "external.json", "cells.parquet", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    figures = json.loads((out / "external.json").read_text())
    assert {"about", "answers", "cells", "patients", "calibration", "per_patient"} <= set(figures)
    assert figures["operating_threshold"] == pytest.approx(THRESHOLD)
    check_intervals(figures)
    # The training patients in the archive are left out, named, and in no figure.
    cells = pd.read_parquet(out / "cells.parquet")
    assert figures["about"]["excluded_patients"] == ["C3", "P62"]
    assert not cells["patient_id"].isin(TRAINED).any()
    assert figures["answers"]["patients"] == 10 and figures["answers"]["cells"] == len(cells)
    assert figures["about"]["skipped_files"] == ["cell_images/README.txt"]
    # The blank cell is rejected, the broken one unreadable; both count as wrong everywhere.
    answers = figures["answers"]
    assert answers["rejected"] >= 1 and answers["error"] == 1
    assert answers["ok"] + answers["rejected"] + answers["error"] == len(cells)
    unanswered = cells[cells["status"] != "ok"]
    assert set(unanswered["path"]) >= {"cell_images/Parasitized/C99P35ThinF_IMG_blank_cell_1.png",
                                       "cell_images/Uninfected/C99P35ThinF_IMG_broken_cell_2.png"}
    assert not unanswered["correct"].any() and (unanswered["p_pos"] == 0.5).all()
    assert figures["cells"]["operating_point"]["accuracy"]["value"] == pytest.approx(cells["correct"].mean())
    called = np.where(cells["status"] == "ok", cells["p_model"] >= 0.5, ~cells["is_pos"])
    assert figures["cells"]["threshold_0.5"]["accuracy"]["value"] == pytest.approx(
        np.mean(called == cells["is_pos"]))
    p35 = next(p for p in figures["per_patient"] if p["patient_id"] == "P35")
    assert p35["rejected"] >= 1 and p35["errors"] == 1
    report = (out / "external.md").read_text()
    for text in ("# External validation: external-test v", "## Answers", "## Cells (95% CI",
                 "## Patients (95% CI", "## The 10 worst patients", "## Calibration",
                 "left out: C3, P62", "without answer", "![reliability](reliability.png)"):
        assert text in report, text
    # The MLflow record: a run in the model's experiment, and one line on the version.
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.run_name == f"external/new_patients/v{version}" and run.info.status == "FINISHED"
    assert run.info.experiment_id == versions["with_record_experiment"]
    assert run.data.tags["model_name"] == NAME and run.data.tags["model_version"] == version
    assert run.data.metrics["cell_accuracy"] == pytest.approx(figures["cells"]["threshold_0.5"]["accuracy"]["value"])
    assert {"cell_op_accuracy_ci_low", "patient_roc_auc", "rejected_cells", "unreadable_cells"} <= set(run.data.metrics)
    assert "external.md" in {a.path for a in client.list_artifacts(result.run_id)}
    description = client.get_model_version(NAME, version).description
    assert description.startswith("Registered by the test.\n\nExternal validation on new_patients.zip "
                                  f"(10 patients, {len(cells)} cells, ")
    assert description.endswith(f"; run {result.run_id}") and result.description in description


def test_a_model_evaluated_with_tta_is_validated_with_tta(versions, cells_small, reject_checkpoint, tmp_path):
    from pipeline.data.images import load_rgb
    from pipeline.serving.inference import Predictor

    plain = run_validate(cells_small, versions["with_record"], tmp_path / "plain", exclude_overlap=True)
    tta = run_validate(cells_small, versions["with_tta"], tmp_path / "tta", exclude_overlap=True)
    assert tta.figures["about"]["threshold_note"].endswith("; TTA on, as evaluate had it")
    assert "TTA" not in plain.figures["about"]["threshold_note"]
    cells = pd.read_parquet(tmp_path / "tta" / "cells.parquet").query("status == 'ok'").head(8)
    with zipfile.ZipFile(cells_small) as z:
        images = [load_rgb(z.read(p)) for p in cells["path"]]
    predictor = Predictor.from_checkpoint(reject_checkpoint)
    expected = predictor.predict(images, tta=True)[:, predictor.meta.class_names.index(POSITIVE)]
    assert cells["p_model"].to_numpy() == pytest.approx(expected, abs=1e-5)
    untouched = pd.read_parquet(tmp_path / "plain" / "cells.parquet").set_index("path").loc[cells["path"]]
    assert np.abs(untouched["p_model"].to_numpy() - expected).max() > 1e-4  # the two differ


def test_training_patients_in_the_archive_are_refused_by_default(versions, archive, tmp_path):
    message = (f"2 of the archive's 12 patients are training patients of {NAME} v{versions['with_record']} "
               "(e.g. C3, P62): figures on them would flatter it. Validate on patients it never saw, or "
               "leave these out with --exclude-overlap (validate.exclude_overlap: true)")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        run_validate(archive, versions["with_record"], tmp_path / "external")
    assert not (tmp_path / "external").exists()


def test_a_version_without_its_training_patients_on_record_is_refused(versions, archive, tmp_path):
    with pytest.raises(UserError, match=f"cannot validate {NAME} v{versions['without_record']} externally: "
                                        ".* has no record of its training patients"):
        run_validate(archive, versions["without_record"], tmp_path / "external", exclude_overlap=True)


def cell_table(patients: int, p_pos: list[float], is_pos: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": np.repeat([f"P{i}" for i in range(patients)], len(p_pos)),
                         "is_pos": is_pos * patients, "p_pos": p_pos * patients})


def test_paired_difference_of_identical_models_is_zero_with_a_zero_interval():
    table = cell_table(6, [0.9, 0.6, 0.4, 0.2, 0.7, 0.3], [True, True, False, False, False, True])
    diff = paired_difference(table, table.copy(), n_boot=200)
    assert (diff[["difference", "ci_low", "ci_high"]].to_numpy() == 0).all()


def test_paired_difference_of_a_model_better_on_every_patient_lies_above_zero():
    is_pos = [True, True, True, False, False, False]
    better = cell_table(5, [0.9, 0.8, 0.7, 0.1, 0.2, 0.25], is_pos)
    # Each patient: one positive cell called negative, ranked below the negatives.
    worse = cell_table(5, [0.9, 0.8, 0.05, 0.1, 0.2, 0.25], is_pos)
    diff = paired_difference(better, worse, n_boot=100)
    assert diff.loc["accuracy", "difference"] == pytest.approx(1 / 6)
    assert (diff["ci_low"] > 0).all() and (diff["ci_low"] <= diff["difference"]).all()
    assert (diff["difference"] <= diff["ci_high"]).all()
    flipped = paired_difference(worse, better, n_boot=100)
    assert (flipped["ci_high"] < 0).all()
    # A table of correct calls (no probabilities) gives the accuracy only.
    calls = better.assign(correct=True).drop(columns="p_pos")
    only_acc = paired_difference(calls, worse.assign(correct=(worse["p_pos"] >= 0.5) == worse["is_pos"]))
    assert only_acc.loc["accuracy", "difference"] == pytest.approx(1 / 6)
    assert np.isnan(only_acc.loc["roc_auc", "difference"])


def test_paired_difference_refuses_tables_of_different_cells():
    table = cell_table(3, [0.9, 0.2], [True, False])
    with pytest.raises(ValueError, match="the same cells in the same order"):
        paired_difference(table, table.iloc[::-1].reset_index(drop=True))


@pytest.mark.sample(POOL_ENV)
def test_validate_on_new_patients_of_the_external_pool(versions, pool_zip, tmp_path):
    """About 300 real cells of four pool patients (two infected, two healthy donors)."""
    slice_zip = tmp_path / "pool_slice.zip"
    with zipfile.ZipFile(pool_zip) as src, zipfile.ZipFile(slice_zip, "w") as dst:
        names = sorted(n for n in src.namelist() if n.endswith(".png"))
        patients = sorted({SPEC.group_of(n) for n in names})
        chosen = [p for p in patients if p.startswith("P")][:2] + [p for p in patients if p.startswith("C")][:2]
        for patient in chosen:
            for name in [n for n in names if SPEC.group_of(n) == patient][:75]:
                dst.writestr(name, src.read(name))
    result = run_validate(slice_zip, versions["with_record"], tmp_path / "external")
    figures = result.figures
    assert figures["answers"]["patients"] == 4 and figures["about"]["excluded_patients"] == []
    assert 250 <= figures["answers"]["cells"] <= 300
    check_intervals(figures)
    report = result.report.read_text()
    assert all(f"| {patient} " in report for patient in chosen)  # the worst-patients table names them


def test_paired_difference_of_one_seed_in_a_list_is_the_single_table_figure():
    rng = np.random.default_rng(3)
    is_pos = list(rng.uniform(size=8) > 0.5)
    a, b = (cell_table(5, list(rng.uniform(size=8)), is_pos) for _ in range(2))
    pd.testing.assert_frame_equal(paired_difference([a], [b], n_boot=50), paired_difference(a, b, n_boot=50))
