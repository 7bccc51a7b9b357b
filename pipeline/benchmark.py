"""Throughput measurements behind the README's tables.

``pipeline benchmark scoring --model models:/malaria@champion --images 20000``
writes N PNG cells (copies of the prepared test images, cycled) to a folder,
times ``score`` over them, then times the plain forward pass of the same model
on the same images (already decoded and resized) with the same batch size and
the same number of CPU threads, and prints both and their ratio.

``pipeline benchmark augment`` times the strong augmentation preset
against one training step of the model, both on one CPU core.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ScoreConfig
from pipeline.prepared import PreparedData


def write_images(prepared: Path, n: int, out: Path) -> None:
    """``n`` PNG files cycled from the prepared test split's original images."""
    data = PreparedData(prepared)
    paths = data.rows("test")["path"].tolist()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = data.images_dir / paths[i % len(paths)]
        (out / f"{i:06d}.png").write_bytes(src.read_bytes())


def forward_throughput(model_uri: str, folder: Path, batch_size: int, threads: int) -> float:
    """Images/s of the bare forward pass on pre-decoded, pre-resized images."""
    import mlflow

    from pipeline.images import load_rgb, resize
    from pipeline.inference import to_tensor

    predictor = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
    size = predictor.meta.image_size
    images = np.stack([resize(load_rgb(p.read_bytes()), size) for p in sorted(folder.iterdir())])
    torch.set_num_threads(threads)
    model = predictor.model
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            torch.softmax(model(to_tensor(images[start:start + batch_size], predictor.meta)), 1)
    return len(images) / (time.perf_counter() - t0)


def augment_vs_train_step(prepared: Path, preset: str = "strong", model: str = "efficientnet_lite0",
                          batch_size: int = 64, n_images: int = 1024) -> dict[str, float]:
    """Images/s of the augmentation policy and of a training step, each on one core."""
    import cv2

    from pipeline.augment import build_train_transform
    from pipeline.config import AugmentConfig
    from pipeline.inference import ModelMeta, to_tensor
    from pipeline.models import create_model, model_info
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = np.asarray(PreparedData(prepared).split("train").images[:n_images])
    size = images.shape[1]
    transform = build_train_transform(AugmentConfig(preset=preset), size, seed=0)
    t0 = time.perf_counter()
    for img in images:
        transform(image=img)
    aug = len(images) / (time.perf_counter() - t0)
    net = create_model(model, 2, pretrained=False).to(memory_format=torch.channels_last).train()
    info = model_info(model)
    meta = ModelMeta(model, ("a", "b"), size, info.mean, info.std)
    opt = torch.optim.AdamW(net.parameters())
    steps, t0 = 0, time.perf_counter()
    for start in range(0, min(len(images), 4 * batch_size), batch_size):
        x = to_tensor(images[start:start + batch_size], meta)
        loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(len(x), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += len(x)
    step = steps / (time.perf_counter() - t0)
    return {"image_size": size, "preset": preset, "augment_images_per_s": round(aug, 1),
            "train_step_images_per_s": round(step, 1), "model": model}


def scoring_vs_forward(model: str, prepared: Path, n_images: int, batch_size: int,
                       concurrency: int) -> dict[str, float]:
    """``score`` over ``n_images`` files against the bare forward pass of the same model."""
    from pipeline.score import resolve_model, score
    from pipeline.tracking import setup_mlflow

    setup_mlflow()
    uri = resolve_model(model).uri
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "cells"
        write_images(prepared, n_images, folder)
        cfg = ScoreConfig(input=str(folder), batch_size=batch_size, concurrency=concurrency)
        scored = score(cfg, uri, Path(d) / "preds.parquet")
        forward = forward_throughput(uri, folder, batch_size, concurrency)
    return {"images": n_images, "batch_size": batch_size, "cpus": concurrency,
            "score_images_per_s": round(scored.images_per_s, 1),
            "forward_images_per_s": round(forward, 1),
            "ratio": round(scored.images_per_s / forward, 3)}


if __name__ == "__main__":  # ``python -m pipeline.benchmark ...`` = ``pipeline benchmark ...``
    from pipeline.__main__ import main

    main(["benchmark", *sys.argv[1:]])
