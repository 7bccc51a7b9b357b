"""score: Ray Data batch scoring of a folder or zip, with a corrupt image in the input."""

from __future__ import annotations

import time
import zipfile

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest

from pipeline.config import ScoreConfig
from pipeline.data.synthetic import png_bytes, synthetic_cell
from pipeline.serving.score import resolve_model, score
from tests.conftest import own_ray_processes


@pytest.fixture(scope="module")
def champion(model_uris) -> str:
    mv = mlflow.register_model(model_uris(), "score-test")
    mlflow.MlflowClient().set_registered_model_alias("score-test", "champion", mv.version)
    return "models:/score-test@champion"


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cells"
    (root / "a").mkdir(parents=True)
    for i in range(7):
        (root / "a" / f"cell_{i}.png").write_bytes(png_bytes(synthetic_cell(rng, i % 2 == 0)))
    good = png_bytes(synthetic_cell(rng, True))
    (root / "a" / "broken.png").write_bytes(good[: len(good) // 2])
    (root / "a" / "Thumbs.db").write_bytes(b"not an image")
    return root


def test_corrupt_image_gets_an_error_row_and_the_rest_are_scored(ray_local, champion,
                                                                 image_folder, tmp_path):
    out = tmp_path / "scores" / "predictions.parquet"
    result = score(ScoreConfig(input=str(image_folder), batch_size=3), champion, out)
    table = pd.read_parquet(out)
    assert len(table) == result.n_images == 8  # Thumbs.db is skipped, not scored
    assert result.skipped == ("a/Thumbs.db",) and result.n_errors == 1
    bad = table[table["path"] == "a/broken.png"].iloc[0]
    assert "image" in bad["error"] and pd.isna(bad["predicted_label"])
    good = table[table["path"] != "a/broken.png"]
    assert good["error"].isna().all()
    assert set(good["predicted_label"]) <= {"Parasitized", "Uninfected"}
    assert ((good["probability"] >= 0.5) & (good["probability"] <= 1)).all()
    assert (table["model_version"] == "1").all()
    assert {"path", "predicted_label", "probability", "model_version", "error"} <= set(table)


def test_zip_input_and_in_process_scoring_score_the_same_as_the_folder_through_ray(ray_local, champion, image_folder, tmp_path):
    archive = tmp_path / "cells.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(image_folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(image_folder).as_posix())
    # The folder through Ray Data, the zip in-process (a small job): the same predictions.
    a = pd.read_parquet(score(ScoreConfig(input=str(image_folder), local_max_images=0), champion,
                              tmp_path / "a.parquet").output)
    b = pd.read_parquet(score(ScoreConfig(input=str(archive)), champion, tmp_path / "b.parquet").output)
    a, b = a.sort_values("path").reset_index(drop=True), b.sort_values("path").reset_index(drop=True)
    assert a["path"].tolist() == b["path"].tolist()
    assert np.allclose(a["probability"].fillna(-1), b["probability"].fillna(-1))


def test_alias_resolves_to_a_fixed_version_and_missing_alias_is_clear(champion, tracking_uri):
    assert resolve_model(champion).uri == "models:/score-test/1"
    with pytest.raises(ValueError, match="Run the register stage"):
        resolve_model("models:/score-test@no-such-alias")


def test_every_kind_of_bad_input_gets_a_row(ray_local, champion, tmp_path):
    """Zero-byte, not-an-image, truncated, grey-scale, RGBA, a decompression bomb, a missing file."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "bad"
    root.mkdir()
    good = png_bytes(synthetic_cell(rng, True))
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_bytes(b"this is not a png")
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(synthetic_cell(rng, False)[..., 0]).save(root / "grey.png")
    Image.fromarray(synthetic_cell(rng, True, 80)).convert("RGBA").save(root / "rgba.png")
    Image.new("L", (9000, 9000)).save(root / "bomb.png")  # 81 MP > the 50 MP limit
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(p) for p in sorted(root.iterdir())] + [str(root / "gone.png")]}) \
        .to_csv(listing, index=False)
    out = score(ScoreConfig(input=str(listing), batch_size=4), champion, tmp_path / "p.parquet")
    table = pd.read_parquet(out.output).assign(name=lambda t: t["path"].map(lambda p: p.split("/")[-1]))
    errors = table.set_index("name")["error"]
    assert len(table) == 7 and out.n_errors == 5
    assert pd.isna(errors["grey.png"]) and pd.isna(errors["rgba.png"])  # converted to RGB
    assert "empty" in errors["zero.png"] and "image" in errors["text.png"]
    assert "truncated" in errors["truncated.png"] and "pixels" in errors["bomb.png"]
    assert "cannot read" in errors["gone.png"]


def test_glob_input_and_cli(ray_local, champion, image_folder, tmp_path, capsys):
    from pipeline.__main__ import main

    out = tmp_path / "cli.parquet"
    main(["score", "--model", champion, "--input", str(image_folder / "a" / "cell_*.png"),
          "--output", str(out), "--tta"])
    assert "answered 7 / 7 images (0 rejected, 0 failed)" in capsys.readouterr().out
    assert len(pd.read_parquet(out)) == 7


def test_patient_summary_counts_cells_errors_and_label_shares():
    from pipeline.data.datasets import malaria_patient_id
    from pipeline.serving.predictions import patient_summary

    preds = pd.DataFrame({
        "path": ["a/C1P1_x.png", "a/C1P1_y.png", "a/C1P1_z.png", "b/C2P7_x.png", "weird.png"],
        "predicted_label": ["Parasitized", "Uninfected", None, "Uninfected", "Uninfected"],
        "error": [None, None, "corrupt", None, None],
        "status": ["ok", "ok", "error", "ok", "ok"],
    })
    table = patient_summary(preds, malaria_patient_id, ("Parasitized", "Uninfected")).set_index("patient_id")
    assert table.loc["P1", "cells"] == 3 and table.loc["P1", "errors"] == 1
    assert table.loc["P1", "fraction_Parasitized"] == 0.5
    assert table.loc["P7", "fraction_Uninfected"] == 1.0
    assert "weird" not in "".join(table.index)
    assert table["called"].all() and (table["rejected"] == 0).all()


def test_a_patient_whose_cells_are_mostly_refused_is_not_called_healthy():
    from pipeline.data.datasets import malaria_patient_id
    from pipeline.serving.predictions import patient_summary

    preds = pd.DataFrame({"path": [f"C1P1_{i}.png" for i in range(5)],
                          "predicted_label": ["Uninfected", "Uninfected", None, None, None],
                          "error": [None, None, None, None, "corrupt"],
                          "status": ["ok", "ok", "rejected", "rejected", "error"]})
    row = patient_summary(preds, malaria_patient_id, ("Parasitized", "Uninfected")).iloc[0]
    assert (row["cells"], row["rejected"], row["errors"]) == (5, 2, 1)
    assert row["fraction_Uninfected"] == 1.0 and not row["called"]  # 2 of 5 answered: no call


def test_patient_summary_has_a_column_for_every_class_even_one_never_predicted():
    from pipeline.data.datasets import malaria_patient_id
    from pipeline.serving.predictions import patient_summary

    preds = pd.DataFrame({"path": ["C1P1_x.png", "C1P1_y.png"], "predicted_label": ["Uninfected"] * 2,
                          "error": [None, None], "status": ["ok", "ok"]})
    table = patient_summary(preds, malaria_patient_id, ("Parasitized", "Uninfected"))
    assert table["fraction_Parasitized"].tolist() == [0.0]
    assert table["fraction_Uninfected"].tolist() == [1.0]


CLASSES = ("Parasitized", "Uninfected")


def _batch(paths: list[str], failed: set[str]) -> pd.DataFrame:
    """A prediction batch as the scoring actor returns it (format_predictions + path/version)."""
    from pipeline.serving.predictions import format_predictions

    errors = ["cannot read file: gone" if p in failed else None for p in paths]
    status = ["error" if e else "ok" for e in errors]
    probs = np.tile([[0.8, 0.2]], (len(paths), 1))
    preds = format_predictions(probs, status, errors, np.full(len(paths), 0.3), CLASSES)
    preds.insert(0, "path", np.array(paths, dtype=object))
    preds["model_version"] = "3"
    return preds


# Each case is a forced order of batches: which batch comes first must not matter.
WRITER_ORDERS = {
    "all good, then one error": [(["a", "b"], set()), (["c", "d"], {"d"})],
    "one error, then all good": [(["a", "b"], {"a"}), (["c", "d"], set())],
    "all failed, then all good": [(["a", "b"], {"a", "b"}), (["c", "d"], set())],
    "all good, then all failed": [(["a", "b"], set()), (["c", "d"], {"c", "d"})],
    "all failed only": [(["a", "b"], {"a", "b"}), (["c"], {"c"})],
    "empty input": [],
}


@pytest.mark.parametrize("order", list(WRITER_ORDERS))
def test_writer_takes_batches_in_any_order(order, tmp_path):
    from pipeline.serving.predictions import predictions_schema, write_predictions

    batches = [_batch(paths, failed) for paths, failed in WRITER_ORDERS[order]]
    out = tmp_path / "p.parquet"
    n, n_err, _ = write_predictions(iter(batches), out, predictions_schema(CLASSES))
    table = pd.read_parquet(out)
    expected = pd.concat(batches, ignore_index=True) if batches else None
    assert n == len(table) == (0 if expected is None else len(expected))
    assert n_err == int(table["error"].notna().sum())
    import pyarrow.parquet as pq

    assert pq.read_schema(out).types == predictions_schema(CLASSES).types  # never null-typed
    assert list(table.columns) == ["path", "predicted_label", "probability", "prob_Parasitized",
                                   "prob_Uninfected", "status", "reason", "ood_score", "error",
                                   "model_version"]
    if expected is not None:
        assert table["path"].tolist() == expected["path"].tolist()
        failed = table["error"].notna()
        assert table.loc[failed, "predicted_label"].isna().all() and (table.loc[failed, "status"] == "error").all()
        assert table.loc[failed, "prob_Parasitized"].isna().all()  # an error row has no probabilities
        assert (table.loc[~failed, "predicted_label"] == "Parasitized").all()
        assert np.allclose(table.loc[~failed, "prob_Parasitized"], 0.8)


def test_writer_leaves_no_output_when_a_batch_fails(tmp_path):
    from pipeline.serving.predictions import predictions_schema, write_predictions

    def batches():
        yield _batch(["a"], set())
        raise RuntimeError("actor died")

    out = tmp_path / "p.parquet"
    with pytest.raises(RuntimeError, match="actor died"):
        write_predictions(batches(), out, predictions_schema(CLASSES))
    assert list(tmp_path.iterdir()) == []


def _unreadable_at_start_middle_end(root):
    """12 good cells and 3 unreadable files that sort first, in the middle and last."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for i in range(12):
        (root / f"m{i:02d}_cell.png").write_bytes(png_bytes(synthetic_cell(rng, i % 2 == 0)))
    bad = {"000_first.png": b"", "m05_middle.png": b"text, not a png", "zzz_corrupt.png": b"not an image"}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return bad


@pytest.mark.parametrize("local_max_images,decode", [(0, "actor"), (0, "tasks"), (500, "auto")],
                         ids=["ray-decode-in-actor", "ray-decode-tasks", "in-process"])
@pytest.mark.parametrize("container", ["folder", "zip"])
def test_unreadable_images_anywhere_in_the_input_get_error_rows(container, local_max_images, decode,
                                                                ray_local, champion, tmp_path):
    root = tmp_path / "cells"
    bad = _unreadable_at_start_middle_end(root)
    source = root
    if container == "zip":
        source = tmp_path / "cells.zip"
        with zipfile.ZipFile(source, "w") as zf:
            for p in sorted(root.iterdir()):
                zf.write(p, p.name)
    result = score(ScoreConfig(input=str(source), batch_size=4, local_max_images=local_max_images,
                               decode=decode), champion, tmp_path / "out.parquet")
    assert result.engine == ("ray" if local_max_images == 0 else "local")
    table = pd.read_parquet(result.output)
    assert len(table) == table["path"].nunique() == 15 == result.n_images
    assert result.n_errors == 3
    errors = table.set_index("path")["error"]
    assert "empty" in errors["000_first.png"]
    assert "not a readable image" in errors["m05_middle.png"]
    assert "not a readable image" in errors["zzz_corrupt.png"]
    assert errors.drop(list(bad)).isna().all()
    assert table.set_index("path").loc[list(bad), "predicted_label"].isna().all()


@pytest.mark.slow
def test_a_scoring_actor_killed_mid_job_still_scores_every_input_exactly_once(ray_local, champion,
                                                                             tmp_path):
    import threading

    rng = np.random.default_rng(11)
    root = tmp_path / "many"
    root.mkdir()
    for i in range(400):
        (root / f"cell_{i:04d}.png").write_bytes(png_bytes(synthetic_cell(rng, i % 2 == 0, 48)))
    out = tmp_path / "out.parquet"
    killed = []

    def kill_the_predictor() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            # this process's Ray instance only: another test process may be scoring beside it
            for proc in own_ray_processes("BatchPredictor"):
                time.sleep(1.0)  # let it score some batches first
                try:
                    proc.kill()
                except psutil.NoSuchProcess:  # Ray Data let this one go meanwhile: find another
                    break
                killed.append(time.time())
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_predictor, daemon=True)
    killer.start()
    result = score(ScoreConfig(input=str(root), batch_size=8, local_max_images=0), champion, out)
    finished = time.time()
    killer.join(timeout=5)
    assert killed, "no predictor actor was found to kill"
    assert finished - killed[0] > 1.0, "the job had (nearly) finished before the kill: no fault injected"
    table = pd.read_parquet(out)
    assert len(table) == result.n_images == 400
    assert table["path"].nunique() == 400 and set(table["path"]) == {p.name for p in root.iterdir()}
    assert table["error"].isna().all()


def test_actor_count_auto_is_one_per_cpu_up_to_eight_each_on_one_thread(ray_local, monkeypatch):
    from pipeline.serving.score import actor_count, actor_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert actor_count(ScoreConfig()) == 2  # the fixture's Ray has 2 CPUs
    assert actor_threads(ScoreConfig(), 2) == 1
    assert actor_count(ScoreConfig(cpus_per_actor=2.0)) == 1
    assert actor_count(ScoreConfig(concurrency=3)) == 3
    assert actor_count(ScoreConfig(use_gpu=True)) == 1  # no GPU in the cluster: one actor waits for one
    assert actor_threads(ScoreConfig(use_gpu=True), 1) == 0
    assert actor_threads(ScoreConfig(threads_per_actor=3), 2) == 3


def test_a_refused_image_has_no_label_in_the_parquet(champion, tmp_path):
    """In the scored table as in every other output: a rejected row keeps its path, status and
    reason, and no label or probability a count of "Uninfected" could pick up."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cell.png").write_bytes(png_bytes(synthetic_cell(rng, True)))
    (folder / "blank.png").write_bytes(png_bytes(np.full((60, 60, 3), 200, np.uint8)))
    out = tmp_path / "p.parquet"
    result = score(ScoreConfig(input=str(folder)), champion, out)
    table = pd.read_parquet(out).set_index("path")
    assert result.engine == "local" and result.n_rejected == 1
    assert table.loc["blank.png", "status"] == "rejected" and "near-uniform" in table.loc["blank.png", "reason"]
    assert table.loc[["blank.png"], ["predicted_label", "probability", "prob_Parasitized",
                                     "prob_Uninfected"]].isna().all().all()
    assert table.loc["cell.png", "status"] == "ok" and table.loc["cell.png", "predicted_label"] in CLASSES


def test_a_dataset_without_patients_gets_an_empty_patient_table():
    from pipeline.serving.predictions import patient_summary

    preds = pd.DataFrame({"path": ["a.png"], "predicted_label": ["Uninfected"], "error": [None],
                          "status": ["ok"]})
    table = patient_summary(preds, None, CLASSES)
    assert table.empty and {"rejected", "called", "fraction_Uninfected"} <= set(table.columns)
