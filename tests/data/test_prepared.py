"""prepared: the reader of the folder prepare writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data.prepared import MANIFEST, PreparedData


def test_splits_are_aligned_with_the_manifest(prepared_synthetic):
    data = PreparedData(prepared_synthetic)
    manifest = pd.read_parquet(prepared_synthetic / MANIFEST)
    assert data.class_names == ["Parasitized", "Uninfected"] and data.image_size == 32
    for name in ("train", "val", "test"):
        part = data.split(name)
        rows = manifest[manifest["split"] == name].sort_values("index")
        assert len(part) == len(rows) == len(part.images) == len(part.groups) == len(part.paths)
        assert part.paths.tolist() == rows["path"].tolist()
        assert np.array_equal(np.array(data.class_names)[part.labels], rows["label"].to_numpy())
        assert (data.images_dir / part.paths[0]).is_file()


def test_split_ids_are_content_hashes(prepared_synthetic):
    data = PreparedData(prepared_synthetic)
    ids = {s: data.split_id(s) for s in ("train", "val", "test")}
    assert len(set(ids.values())) == 3 and all(len(i) == 16 for i in ids.values())
    assert data.dataset_id() == "-".join(ids[s] for s in ("train", "val", "test"))
    assert PreparedData(prepared_synthetic).split_id("test") == ids["test"]


def test_not_a_prepared_folder_and_unknown_split_are_clear_errors(prepared_synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the prepare stage"):
        PreparedData(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        PreparedData(prepared_synthetic).split("dev")
