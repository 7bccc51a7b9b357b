"""runs: the run folder on paths and URIs, and its name as a function of settings and data."""

from __future__ import annotations

import pytest

from pipeline.training.runs import RunStore, run_store


@pytest.mark.parametrize("storage", ["ray-runs", "file://{tmp}/ray-runs"])
def test_run_store_reads_writes_and_deletes_on_paths_and_uris(tmp_path, monkeypatch, storage):
    monkeypatch.chdir(tmp_path)
    store = RunStore.at(storage.format(tmp=tmp_path), "lite0-abc")
    assert store.storage.endswith("ray-runs") and ("://" in store.storage or store.storage.startswith("/"))
    assert store.read("mlflow_run_id.txt") is None
    store.write("mlflow_run_id.txt", "run-1")
    assert (tmp_path / "ray-runs/lite0-abc/mlflow_run_id.txt").read_text() == "run-1"
    assert store.read("mlflow_run_id.txt") == "run-1"
    store.delete()
    assert not (tmp_path / "ray-runs/lite0-abc").exists()
    store.delete()  # nothing left: no error


def test_run_name_changes_with_params_and_data_only(prepared_synthetic, tmp_path):
    from pipeline.data.prepared import PreparedData

    data = PreparedData(prepared_synthetic)
    a = run_store(str(tmp_path), "lite0", {"train.lr": 0.1}, data)
    assert a == run_store(str(tmp_path), "lite0", {"train.lr": 0.1}, data)
    assert a.name != run_store(str(tmp_path), "lite0", {"train.lr": 0.2}, data).name
    assert a.name.startswith("lite0-")
