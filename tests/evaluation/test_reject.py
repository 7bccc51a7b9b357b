"""The reject option: generated non-cells are refused, real cells are answered, degraded cells
are reported, and no refused row carries a label through any entry point."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data.images import load_rgb
from pipeline.evaluation.reject import (
    benchmark,
    degraded,
    non_cells,
    outcomes,
    zip_cells,
)
from pipeline.serving.inference import Predictor
from pipeline.serving.screening import InputLimits, appearance, screen
from tests.conftest import POOL_ENV

LABELLED = ["predicted_label", "probability", "prob_Parasitized", "prob_Uninfected"]


def assert_only_ok_rows_are_labelled(rows: pd.DataFrame) -> None:
    assert set(rows["status"]) <= {"ok", "rejected", "error"}
    refused = rows[rows["status"] != "ok"]
    assert refused[LABELLED].isna().all().all(), refused
    assert refused["reason"].notna().all()
    ok = rows[rows["status"] == "ok"]
    assert ok[LABELLED].notna().all().all() and ok["reason"].isna().all()


@pytest.fixture(scope="module")
def predictor(reject_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(reject_checkpoint)


@pytest.fixture(scope="module")
def real_test_cells(prepared_cells) -> list[bytes]:
    from pipeline.data.prepared import PreparedData

    data = PreparedData(prepared_cells)
    return [(data.images_dir / p).read_bytes() for p in data.rows("test")["path"]]


def test_every_kind_of_generated_non_cell_is_rejected(predictor, real_test_cells):
    result = benchmark(predictor, {"test split": real_test_cells}, per_kind=12)
    kinds = {r["kind"]: r["rejected"] for r in result["per_kind"] if r["group"] == "non-cells"}
    assert len(kinds) == 9 and min(kinds.values()) >= 0.9, kinds
    assert result["non_cells_rejected"] >= 0.99
    assert result["auroc_non_cells_vs_real"] > 0.99


def test_real_cells_are_answered_and_cells_stored_wide_are_still_cells(predictor, real_test_cells):
    rows = outcomes(predictor, real_test_cells)
    assert_only_ok_rows_are_labelled(rows)
    assert (rows["status"] == "ok").sum() >= len(rows) - 1  # 36 cells of 2 unseen patients
    kinds = degraded([load_rgb(b) for b in real_test_cells[:10]], np.random.default_rng(0))
    for kind in ("cell as 16-bit grey PNG", "cell as float TIFF"):
        wide = outcomes(predictor, kinds[kind])
        assert (wide["status"] == "ok").all(), (kind, wide["reason"].tolist())


@pytest.mark.sample(POOL_ENV)
def test_at_most_one_percent_of_the_pools_cells_are_rejected(predictor, pool_zip):
    rows = outcomes(predictor, zip_cells(pool_zip, 400, seed=1))
    assert (rows["status"] != "ok").mean() <= 0.01


def test_each_input_check_says_why():
    limits = InputLimits(min_side=40, max_side=200, max_aspect=1.6)
    cell = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    assert screen(cell, limits) is None
    assert "size 1000x1 px is far outside" in screen(np.repeat(cell[:1, :1], 1000, axis=1), limits)
    assert "aspect ratio 3.0:1" in screen(cell[:50, :150] if cell.shape[1] >= 150 else
                                          np.concatenate([cell, cell], 1)[:50, :150], limits)
    assert "near-uniform content" in screen(np.full((90, 90, 3), 7, np.uint8), limits)
    assert appearance(cell[None, :64, :64]).shape == (1, 9)  # colour mean, spread; border, centre, detail


def test_no_refused_row_carries_a_label_through_the_pyfunc_and_arrays(reject_checkpoint):
    from types import SimpleNamespace

    from pipeline.serving.pyfunc import CellClassifier

    model = CellClassifier()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(reject_checkpoint)}))
    generated = non_cells(np.random.default_rng(1), 2)
    images = [b for kind in generated.values() for b in kind] + [b"not an image"]
    rows = model.predict(None, pd.DataFrame({"image": images}))
    assert_only_ok_rows_are_labelled(rows)
    assert (rows["status"] != "ok").all() and rows["status"].iloc[-1] == "error"
    arrays = [load_rgb(b) for b in images[:-1]]
    by_arrays = model.predict_arrays(arrays)
    assert_only_ok_rows_are_labelled(by_arrays)
    # transparency is not visible in decoded arrays; everything else is refused alike
    assert (by_arrays["status"] == "rejected").sum() >= len(arrays) - 2
    loose = model.predict(None, pd.DataFrame({"image": images[:-1]}), params={"ood_threshold": 1e9})
    assert_only_ok_rows_are_labelled(loose)
    assert (loose["status"] == "ok").any()  # the override reaches the threshold
