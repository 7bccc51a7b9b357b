"""The reject option, measured: generated non-cells, degraded real cells and real cells
through the served model's one code path (decode, input checks, out-of-distribution score).

``pipeline report reject`` writes ``reports/reject.md`` and ``.json``: the OOD score's AUROC
for non-cells against real cells, and the reject rate of each kind.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from pipeline.serving.inference import Predictor
from pipeline.serving.predictions import score_rows
from pipeline.serving.pyfunc import decode_encoded
from pipeline.serving.screening import REJECTED


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _tiff_float(rgb: np.ndarray) -> bytes:
    """An image stored as one 32-bit float channel, 0..1 (how a scanner export may look)."""
    buf = io.BytesIO()
    Image.fromarray((rgb.mean(2) / 255.0).astype(np.float32)).save(buf, format="TIFF")
    return buf.getvalue()


def _png16(rgb: np.ndarray) -> bytes:
    return _png((rgb.mean(2) * 257).astype(np.uint16))


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 256, 3)))
    draw = ImageDraw.Draw(img)
    for row in range(0, size, 12):
        draw.text((2, row), "".join(chr(c) for c in rng.integers(65, 91, 12)), fill=(0, 0, 0))
    return np.asarray(img)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A natural-image-like texture: blurred multi-scale noise in random colours (grass, sand)."""
    base = sum(np.asarray(Image.fromarray((rng.random((s, s)) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC), float) * w for s, w in ((4, 0.5), (16, 0.3), (64, 0.2)))
    colour = rng.random(3) * 0.8 + 0.2
    return np.clip(base[..., None] * colour, 0, 255).astype(np.uint8)


def non_cells(rng: np.random.Generator, per_kind: int, size: int = 128) -> dict[str, list[bytes]]:
    """Encoded images of things that are not blood-smear cells, ``per_kind`` of each kind."""
    def each(make: Callable[[], bytes]) -> list[bytes]:
        return [make() for _ in range(per_kind)]

    def gradient() -> np.ndarray:
        ramp = np.linspace(0, 1, size)
        a, b = rng.random(3) * 255, rng.random(3) * 255
        g = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        return np.broadcast_to(a + (b - a) * g, (size, size, 3)).astype(np.uint8)

    def noise() -> np.ndarray:
        return (rng.random((size, size, 3)) * 255).astype(np.uint8)

    def uniform() -> np.ndarray:
        return np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)

    def transparent() -> bytes:
        rgba = np.concatenate([_texture(rng, size), np.zeros((size, size, 1), np.uint8)], axis=2)
        return _png(rgba, "RGBA")

    return {"uniform colour": each(lambda: _png(uniform())), "noise": each(lambda: _png(noise())),
            "gradient": each(lambda: _png(gradient())), "text": each(lambda: _png(_text(rng, size))),
            "natural texture": each(lambda: _png(_texture(rng, size))),
            "extreme aspect ratio": each(lambda: _png(noise()[:2].repeat(4, axis=1))),
            "transparent": each(transparent),
            "texture as float TIFF": each(lambda: _tiff_float(_texture(rng, size))),
            "noise as 16-bit PNG": each(lambda: _png16(noise()))}


def degraded(cells: list[np.ndarray], rng: np.random.Generator) -> dict[str, list[bytes]]:
    """Real cells made worse (still cells: what the model does with them is reported, not judged),
    and real cells stored in 16 bits or as float (still cells: they must be scored)."""
    def jpeg(rgb: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=5)
        return buf.getvalue()

    def blur(rgb: np.ndarray) -> bytes:
        return _png(np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(3))))

    def scaled(rgb: np.ndarray, factor: float) -> bytes:
        return _png(np.clip(rgb.astype(float) * factor, 0, 255).astype(np.uint8))

    def cast(rgb: np.ndarray) -> bytes:
        return _png(np.clip(rgb.astype(float) * np.array([1.0, 0.55, 1.35]), 0, 255).astype(np.uint8))

    return {"blurred": [blur(c) for c in cells], "over-exposed": [scaled(c, 1.8) for c in cells],
            "under-exposed": [scaled(c, 0.35) for c in cells], "colour cast": [cast(c) for c in cells],
            "JPEG quality 5": [jpeg(c) for c in cells], "cell as 16-bit grey PNG": [_png16(c) for c in cells],
            "cell as float TIFF": [_tiff_float(c) for c in cells]}


def zip_cells(archive: str | Path, limit: int, seed: int = 0) -> list[bytes]:
    """Up to ``limit`` PNG members of a zip of real cells, a seeded draw."""
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
        pick = np.random.default_rng(seed).permutation(len(names))[:limit]
        return [zf.read(names[i]) for i in sorted(pick)]


def outcomes(predictor: Predictor, images: list[bytes]) -> pd.DataFrame:
    """The served rows of ``images``: the pyfunc's own decoding, checks and OOD score."""
    pixels, errors, rejects = decode_encoded(images, predictor.meta.image_size, predictor.limits)
    return score_rows(predictor, pixels, errors, rejects)


def reject_table(predictor: Predictor, groups: dict[str, dict[str, list[bytes]]]) -> pd.DataFrame:
    """One row per (group, kind): images, share rejected (errors count as rejected: no label),
    and the share answered with each label."""
    rows = []
    for group, kinds in groups.items():
        for kind, images in kinds.items():
            out = outcomes(predictor, images)
            rows.append({"group": group, "kind": kind, "images": len(out),
                         "rejected": float((out["status"] != "ok").mean()),
                         "by_checks": float(((out["status"] == REJECTED) & out["ood_score"].isna()).mean()),
                         "ood_scores": out["ood_score"].dropna().tolist()})
    return pd.DataFrame(rows)


def ood_auroc(table: pd.DataFrame, cells_group: str, non_cells_group: str) -> float:
    """AUROC of the OOD score, non-cells (positive) against real cells, over the images that
    reached the model (the input checks stop the others before it)."""
    from sklearn.metrics import roc_auc_score

    cells = [s for row in table[table["group"] == cells_group]["ood_scores"] for s in row]
    others = [s for row in table[table["group"] == non_cells_group]["ood_scores"] for s in row]
    if not cells or not others:
        return float("nan")
    return float(roc_auc_score([0] * len(cells) + [1] * len(others), cells + others))


def benchmark(predictor: Predictor, real: dict[str, list[bytes]], per_kind: int = 50,
              seed: int = 0) -> dict:
    """Every group through the served path: reject rates per kind and the OOD score's AUROC."""
    from pipeline.data.images import load_rgb

    rng = np.random.default_rng(seed)
    first = next(iter(real.values()))
    groups = {"non-cells": non_cells(rng, per_kind),
              "degraded cells": degraded([load_rgb(b) for b in first[:per_kind]], rng), "real cells": real}
    table = reject_table(predictor, groups)
    generated = table[table["group"] == "non-cells"]
    overall = float((generated["rejected"] * generated["images"]).sum() / generated["images"].sum())
    return {"per_kind": table.drop(columns="ood_scores").to_dict(orient="records"),
            "non_cells_rejected": overall, "worst_non_cell_kind": float(generated["rejected"].min()),
            "auroc_non_cells_vs_real": ood_auroc(table, "real cells", "non-cells"),
            "model": predictor.meta.model, "image_size": predictor.meta.image_size}


def render(result: dict, command: str) -> str:
    """``reject.md``: the table per group and kind, the headline figures, the command."""
    rows = ["| group | kind | images | rejected | of which by the input checks |", "|---|---|---:|---:|---:|"]
    rows += [f"| {r['group']} | {r['kind']} | {r['images']} | {r['rejected']:.1%} | {r['by_checks']:.1%} |"
             for r in result["per_kind"]]
    return "\n".join([
        "# The reject option, measured", "",
        f"Model: `{result['model']}` at {result['image_size']} px. Generated by `{command}`.", "",
        f"- non-cells rejected: **{result['non_cells_rejected']:.1%}** (the worst kind "
        f"{result['worst_non_cell_kind']:.1%});",
        f"- AUROC of the out-of-distribution score, non-cells against real cells (images that "
        f"reached the model): {result['auroc_non_cells_vs_real']:.4f}.", "",
        "Degraded cells are reported, not judged: a cell the model was not trained to read "
        "(under-exposed, a strong colour cast) is better refused than answered.", "",
        *rows, ""])
