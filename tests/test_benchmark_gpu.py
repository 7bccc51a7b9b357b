"""benchmark_gpu: its smoke run on CPU, so the GPU script cannot rot between GPU machines
(the figures in docs/performance-gpu.md come from a GPU run, not from here)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.benchmark_gpu import main
from pipeline.inference import ModelMeta, save_checkpoint
from pipeline.models import create_model, model_info
from pipeline.synthetic import make_imagefolder_zip

pytestmark = pytest.mark.slow


def test_gpu_benchmark_smoke_runs_every_part_and_writes_the_page(tmp_path):
    cells = make_imagefolder_zip(tmp_path / "cells.zip", n_classes=2, per_class=12, size=40)
    info = model_info("efficientnet_lite0")
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, create_model("efficientnet_lite0", 2, pretrained=False),
                    ModelMeta("efficientnet_lite0", ("class_0", "class_1"), 32, info.mean, info.std))
    page = tmp_path / "performance-gpu.md"
    main(["--cells", str(cells), "--checkpoint", str(checkpoint), "--out", str(page), "--smoke"])
    data = json.loads(page.with_suffix(".json").read_text())
    assert data["machine"]["image_size"] == 32 and data["machine"]["cells"] == 24
    row = data["training"]["by_batch"]["64"]
    assert {"pure_step_fp32", "epoch_resident_fp32", "loader_0_augment", "loader_2_augment"} <= set(row)
    assert all(v > 0 for v in row.values())
    assert data["scoring"]["from_files_2_decoders"] > 0 and data["scoring"]["small_job_100_s"] > 0
    assert 0.0 <= data["precision"]["bf16"]["within_1e-2"] <= 1.0
    text = page.read_text()
    for heading in ("## Training, batch 64", "## Scoring, batch 64", "## Autocast against fp32"):
        assert heading in text
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(["--cells", str(cells), "--out", str(tmp_path / "x.md")])
