"""Plots: CSV for ``dvc plots``, PNG for people (and MLflow), and the offline page
template ``dvc plots show`` fills.

Figures are built with matplotlib's object API (:func:`figure`), which renders
to files without pyplot or a GUI backend, so importing this module changes no
global state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm

from pipeline.clinical import expected_calibration_error
from pipeline.files import atomic_path


def figure(figsize: tuple[float, float]) -> Figure:
    """A figure that renders to files (Agg), independent of pyplot's backend."""
    return Figure(figsize=figsize)


def write_plots(labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                positive: str | None, out: Path) -> dict[str, Path]:
    """ROC, precision-recall, confusion matrix and reliability diagram of the test split."""
    out.mkdir(parents=True, exist_ok=True)
    pos = class_names.index(positive) if positive else len(class_names) - 1
    is_pos = (labels == pos).astype(int)
    fpr, tpr, thr = skm.roc_curve(is_pos, probs[:, pos])
    precision, recall, _ = skm.precision_recall_curve(is_pos, probs[:, pos])
    ece, reliability = expected_calibration_error(is_pos, probs[:, pos])
    frames = {
        "roc": pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)}),
        "pr": pd.DataFrame({"recall": recall, "precision": precision}),
        "confusion": pd.DataFrame({"actual": np.array(class_names)[labels],
                                   "predicted": np.array(class_names)[probs.argmax(1)]}),
        "reliability": reliability,
    }
    paths = {key: out / f"{key}.csv" for key in frames}
    for key, frame in frames.items():
        with atomic_path(paths[key]) as tmp:
            frame.to_csv(tmp, index=False)
    name = class_names[pos]
    paths["roc_png"] = _curve(fpr, tpr, f"AUC = {skm.auc(fpr, tpr):.4f}", "False positive rate",
                              "True positive rate", f"ROC ({name})", out / "roc.png", diagonal=True)
    paths["pr_png"] = _curve(recall, precision, f"AP = {skm.average_precision_score(is_pos, probs[:, pos]):.4f}",
                             "Recall", "Precision", f"Precision-recall ({name})", out / "pr.png")
    paths["reliability_png"] = _curve(reliability["confidence"], reliability["frequency"],
                                      f"ECE = {ece:.4f}", f"Predicted P({name})", "Observed frequency",
                                      "Reliability diagram", out / "reliability.png", diagonal=True,
                                      marker="o")
    fig = figure((4.5, 4.5))
    ax = fig.subplots()
    skm.ConfusionMatrixDisplay.from_predictions(frames["confusion"]["actual"], frames["confusion"]["predicted"],
                                                labels=class_names, ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (test)")
    paths["confusion_png"] = _save(fig, out / "confusion_matrix.png")
    return paths


def _curve(x, y, label: str, xlabel: str, ylabel: str, title: str, path: Path,
           diagonal: bool = False, marker: str | None = None) -> Path:
    fig = figure((4.5, 4.5))
    ax = fig.subplots()
    ax.plot(x, y, label=label, marker=marker)
    if diagonal:
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _save(fig, path)


def gradcam_grid(images: np.ndarray, cams: np.ndarray, titles: list[str], path: Path, cols: int = 4) -> Path:
    """Each image beside its Grad-CAM overlay, with a caption."""
    rows = int(np.ceil(len(images) / cols))
    fig = figure((cols * 3.2, rows * 1.9))
    axes = fig.subplots(rows, cols * 2, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, cam, title) in enumerate(zip(images, cams, titles)):
        r, c = divmod(i, cols)
        axes[r, 2 * c].imshow(img)
        axes[r, 2 * c].set_title(title, fontsize=7)
        axes[r, 2 * c + 1].imshow(img)
        axes[r, 2 * c + 1].imshow(cam, cmap="jet", alpha=0.45)
        axes[r, 2 * c + 1].set_title("Grad-CAM", fontsize=7)
    fig.suptitle("Most confident test errors", fontsize=9)
    return _save(fig, path)


def thumbnail_grid(images: np.ndarray, titles: list[str], path: str | Path, title: str,
                   cols: int = 8) -> Path:
    """Images in a grid, each with a short caption (cells a person should look at)."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig = figure((cols * 1.5, rows * 1.7))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, caption in zip(axes.ravel(), images, titles):
        ax.imshow(img)
        ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def _save(fig: Figure, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def augmentation_preview(transform, images: np.ndarray, path: str | Path, n_aug: int = 6) -> Path:
    """Grid PNG: each row one original image, then ``n_aug`` augmented versions by ``transform``."""
    fig = figure((1.4 * (n_aug + 1), 1.4 * len(images)))
    axes = fig.subplots(len(images), n_aug + 1, squeeze=False)
    for r, img in enumerate(images):
        row = [img] + [transform(image=img)["image"] for _ in range(n_aug)]
        for c, shown in enumerate(row):
            axes[r, c].imshow(shown)
            axes[r, c].axis("off")
        axes[r, 0].set_title("original" if r == 0 else "", fontsize=7)
    fig.suptitle("Augmentation preview (original, then augmented)", fontsize=8)
    return _save(fig, Path(path), dpi=100)


def training_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Loss and accuracy per epoch, training beside validation: the PNG twin of the Vega
    training plots, for MLflow and for anyone without a browser at hand."""
    fig = figure((8, 3.4))
    for ax, metric, label in zip(fig.subplots(1, 2), ("loss", "acc"), ("Cross-entropy loss", "Accuracy")):
        ax.plot(history["epoch"], history[f"train_{metric}"], marker="o", label="training")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker="o", label="validation")
        ax.set(xlabel="Epoch", ylabel=label, title=f"{label} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return _save(fig, Path(path))


# DVC's default page loads Vega from a CDN, so offline every Vega plot is blank without a
# word. This page inlines the libraries instead; it has no {scripts} placeholder, which is
# where DVC would put its CDN <script> tags.
OFFLINE_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- Vega __VEGA__, Vega-Lite __VEGALITE__, Vega-Embed __EMBED__: bundled by vl-convert-python, no network needed -->
<script>__BUNDLE__</script>
<style>
body { font-family: sans-serif; }
table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""
VEGA_LITE_VERSION = "5.21"  # the major version of the specs dvc-render writes


def write_offline_template(path: str | Path) -> Path:
    """Write the page template ``dvc plots show`` fills (``plots.html_template`` in
    ``.dvc/config``), with Vega, Vega-Lite and Vega-Embed inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    if "</script" in bundle.lower():  # would end the inline <script> early
        raise RuntimeError("the Vega bundle contains '</script': it cannot be inlined")
    page = (OFFLINE_PAGE.replace("__VEGALITE__", VEGA_LITE_VERSION)
            .replace("__VEGA__", vl_convert.get_vega_version())
            .replace("__EMBED__", vl_convert.get_vega_embed_version())
            .replace("__BUNDLE__", bundle))
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
