"""benchmark: the one command's smoke run, so the comparisons cannot rot (the figures in
docs/performance.md come from the full run, not from here)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import AugmentConfig, TrainConfig

pytestmark = pytest.mark.slow


def test_benchmark_smoke_runs_every_comparison_and_writes_the_page(prepared_synthetic, synthetic_zip,
                                                                   model_uris, ray_local, tmp_path):
    from pipeline.perf_report import SMOKE, ratios, run_all, write

    cfg = TrainConfig(model="baseline_cnn", pretrained=False, regime="scratch", batch_size=16)
    results = run_all(prepared_synthetic, model_uris(), synthetic_zip, "", tmp_path / "work",
                      replace(SMOKE, train_images=64), cfg, AugmentConfig())
    page = tmp_path / "performance.md"
    write(results, page, "pytest")
    text = page.read_text()
    for heading in ("## Batch scoring", "## Training", "## prepare", "## Ratios"):
        assert heading in text
    assert "No GPU on this machine. No GPU run is on record" in text or "GPU:" in text
    # a GPU run's figures beside the page (the project's real one): the page links them
    shutil.copy(Path(__file__).parents[1] / "docs" / "performance-gpu.json", tmp_path)
    write(results, page, "pytest")
    assert "[performance-gpu.md](performance-gpu.md)" in page.read_text()
    data = json.loads(page.with_suffix(".json").read_text())
    assert data["scoring"]["ratio"] > 0 and data["prepare"]["byte_identical"] is True
    assert len(data["training"]["ray"]) == 2  # 1 worker x all cores, all cores x 1 thread
    small = data["small_job"]["16"]
    assert small["in_process"]["engine"] == "local" and small["ray"]["engine"] == "ray"
    assert 0.0 <= data["bf16"]["share_within_1e-2_same_label"] <= 1.0 and data["bf16"]["cells"] > 0
    assert data["training"]["compiled_images_per_s"] > 0
    assert len(ratios(results)) == 7
