"""Throughput measurements behind the README's tables.

``python -m pipeline.benchmark scoring --model models:/malaria@champion --images 20000``
writes N PNG cells (copies of the prepared test images, cycled) to a folder,
times ``score`` over them, then times the plain forward pass of the same model
on the same images (already decoded and resized) with the same batch size and
the same number of CPU threads, and prints both and their ratio.

``python -m pipeline.benchmark augment`` times the strong augmentation preset
against one training step of the model, both on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ScoreConfig
from pipeline.utils import set_quiet_env, setup_logging


def write_images(prepared: Path, n: int, out: Path) -> None:
    """``n`` PNG files cycled from the prepared test split's original images."""
    import pandas as pd

    manifest = pd.read_parquet(prepared / "manifest.parquet")
    paths = manifest.loc[manifest["split"] == "test", "path"].tolist()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = prepared / "images" / paths[i % len(paths)]
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
    from pipeline.prepare import load_split

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = np.asarray(load_split(prepared, "train")[0][:n_images])
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


def main(argv: list[str] | None = None) -> None:
    set_quiet_env()
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("augment", help="augmentation vs training step throughput, one core")
    a.add_argument("--prepared", default="data/prepared")
    a.add_argument("--preset", default="strong")
    parser_s = sub.add_parser("scoring", help="score() vs the bare forward pass")
    parser_s.add_argument("--model", required=True)
    parser_s.add_argument("--prepared", default="data/prepared")
    parser_s.add_argument("--images", type=int, default=20000)
    parser_s.add_argument("--batch-size", type=int, default=64)
    parser_s.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "augment":
        print(json.dumps(augment_vs_train_step(Path(args.prepared), args.preset)))
        return
    from pipeline.score import resolve_model, score
    from pipeline.tracking import tracking_uri

    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    uri = resolve_model(args.model).uri
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "cells"
        write_images(Path(args.prepared), args.images, folder)
        cfg = ScoreConfig(input=str(folder), batch_size=args.batch_size, concurrency=args.concurrency)
        scored = score(cfg, uri, Path(d) / "preds.parquet")
        forward = forward_throughput(uri, folder, args.batch_size, args.concurrency)
    result = {"images": args.images, "batch_size": args.batch_size, "cpus": args.concurrency,
              "score_images_per_s": round(scored.images_per_s, 1),
              "forward_images_per_s": round(forward, 1),
              "ratio": round(scored.images_per_s / forward, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
