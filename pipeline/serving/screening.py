"""The reject option: what the model refuses to answer on.

Two gates, one code path for the pyfunc, ``predict_arrays``, batch scoring and Ray Data actors:

- cheap input checks before the model (:func:`screen`), each with a reason: size or aspect ratio
  far outside the training cells' (:class:`InputLimits`, from the data the model was trained
  on), an alpha channel that hides most of the image, near-uniform content;
- an out-of-distribution score (:class:`RejectOption`), fitted on the training cells: the
  Mahalanobis distance (:class:`Mahalanobis`, class-conditional means and a shared covariance,
  Lee et al. 2018) of the model's penultimate features, and of a few pixel statistics
  (:func:`appearance`: colour, contrast, border, fine detail), which catch what a pretrained
  backbone maps close to cells (noise, gradients, textures). Each distance is divided by its
  threshold, set on the validation cells to accept :data:`VAL_ACCEPT` of them; the score is
  the larger ratio, and above 1 the image is rejected. Both gates travel in the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import cv2
import numpy as np

OK, REJECTED, ERROR = "ok", "rejected", "error"
# Far outside the training cells: a side under half the smallest or over twice the largest, an
# aspect ratio over 1.5x the most elongated training cell.
SIZE_MARGIN, ASPECT_MARGIN = 2.0, 1.5
UNIFORM_STD = 2.0  # pixel standard deviation (8-bit) under which an image shows nothing
TRANSPARENT_SHARE = 0.5  # share of pixels under half alpha that hides the image
VAL_ACCEPT = 0.995  # each OOD threshold accepts this share of the validation cells ...
THRESHOLD_MARGIN = 1.5  # ... times this: validation holds a handful of patients, others differ


@dataclass(frozen=True)
class InputLimits:
    """The training cells' size range, with which :func:`screen` compares an input."""

    min_side: int
    max_side: int
    max_aspect: float

    @classmethod
    def of(cls, widths: np.ndarray, heights: np.ndarray) -> "InputLimits":
        w, h = np.asarray(widths, float), np.asarray(heights, float)
        return cls(int(min(w.min(), h.min())), int(max(w.max(), h.max())),
                   float((np.maximum(w, h) / np.maximum(np.minimum(w, h), 1)).max()))

    def reason(self, width: int, height: int) -> str | None:
        """Why an image of ``width`` x ``height`` is refused, or None."""
        aspect = max(width, height) / max(min(width, height), 1)
        if min(width, height) < self.min_side / SIZE_MARGIN or max(width, height) > self.max_side * SIZE_MARGIN:
            return (f"size {width}x{height} px is far outside the training cells' "
                    f"{self.min_side}-{self.max_side} px")
        if aspect > self.max_aspect * ASPECT_MARGIN:
            return (f"aspect ratio {aspect:.1f}:1 is far outside the training cells' (at most "
                    f"{self.max_aspect:.1f}:1)")
        return None


def transparency_reason(img: Any) -> str | None:
    """Why a PIL image's alpha channel hides it, or None (no alpha, or mostly opaque)."""
    if img.mode not in ("RGBA", "LA", "PA") and not (img.mode == "P" and "transparency" in img.info):
        return None
    alpha = np.asarray(img.convert("RGBA"))[..., 3]
    hidden = float((alpha < 128).mean())
    if hidden > TRANSPARENT_SHARE:
        return f"transparent: {hidden:.0%} of the image is hidden by its alpha channel"
    return None


def content_reason(rgb: np.ndarray) -> str | None:
    """Why decoded pixels show nothing to classify (near-uniform), or None."""
    # OpenCV's one-pass deviation in double: NumPy's took 60 % of decoding a cell
    std = float(cv2.meanStdDev(np.ascontiguousarray(rgb, np.uint8))[1].max())
    if std < UNIFORM_STD:
        return f"near-uniform content (pixel standard deviation {std:.1f} of 255)"
    return None


def screen(rgb: np.ndarray, limits: InputLimits | None, img: Any = None) -> str | None:
    """The first reason the cheap checks refuse a decoded image (``img``: its PIL image, for
    the alpha channel), or None when it may go to the model."""
    reasons = (transparency_reason(img) if img is not None else None,
               limits.reason(rgb.shape[1], rgb.shape[0]) if limits is not None else None,
               content_reason(rgb))
    return next((r for r in reasons if r), None)


@dataclass(frozen=True)
class Mahalanobis:
    """Class-conditional Gaussian with one shared covariance; the score of an input is its
    squared distance to the nearest class mean, divided by ``threshold``."""

    means: np.ndarray      # K x D
    precision: np.ndarray  # D x D, the inverse of the shared (shrunk) covariance
    threshold: float       # the distance that scores 1

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, val_features: np.ndarray) -> "Mahalanobis":
        """Fit on training features; set the threshold to accept :data:`VAL_ACCEPT` of the
        validation features (never fitted on), times :data:`THRESHOLD_MARGIN`."""
        from sklearn.covariance import LedoitWolf

        feats = np.asarray(features, np.float64)
        classes = np.unique(labels)
        means = np.stack([feats[labels == c].mean(0) for c in classes])
        centred = feats - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        unfitted = cls(means.astype(np.float32), precision.astype(np.float32), 1.0)
        threshold = float(np.quantile(unfitted.score(val_features), VAL_ACCEPT)) * THRESHOLD_MARGIN
        return cls(unfitted.means, unfitted.precision, max(threshold, 1e-12))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance of each row of ``features`` to its nearest class mean, over the threshold."""
        import torch

        whiten, means = self._whitened
        # d P d = |d L|^2 with P = L L^T: one matrix product for every class. Torch's, not
        # NumPy's: NumPy's BLAS threads and torch's spun against each other between forward
        # passes (a 2 ms product cost 65 ms a batch of 64 on 2 cores; einsum took 40 % of scoring)
        z = (torch.from_numpy(np.ascontiguousarray(features, np.float32)) @ torch.from_numpy(whiten)).numpy()
        dists = [np.square(z - m).sum(1) for m in means]
        return np.min(np.stack(dists), axis=0).astype(np.float64) / self.threshold

    @cached_property
    def _whitened(self) -> tuple[np.ndarray, np.ndarray]:
        """``L`` with ``precision = L L^T`` (Cholesky, in float64) and the means times ``L``."""
        precision = np.asarray(self.precision, np.float64)
        try:
            whiten = np.linalg.cholesky(precision)
        except np.linalg.LinAlgError:  # stored in float32, a near-singular one may not factor
            values, vectors = np.linalg.eigh(precision)
            whiten = vectors * np.sqrt(np.clip(values, 0.0, None))
        whiten = whiten.astype(np.float32)
        return whiten, np.asarray(self.means, np.float32) @ whiten

    def state(self) -> dict[str, Any]:
        """What goes into the checkpoint (tensors and a float: ``weights_only``-safe)."""
        import torch

        return {"means": torch.from_numpy(self.means), "precision": torch.from_numpy(self.precision),
                "threshold": self.threshold}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Mahalanobis":
        return cls(state["means"].numpy(), state["precision"].numpy(), float(state["threshold"]))


def appearance(pixels: np.ndarray) -> np.ndarray:
    """A few statistics of each ``NxSxSx3`` uint8 image a stained cell crop has in a typical range,
    on a 0..1 scale: mean and spread of each colour, the border's and the centre's brightness,
    and fine detail (mean absolute difference of neighbouring pixels)."""
    px = np.ascontiguousarray(pixels, np.uint8)
    n, s = px.shape[:2]
    ring, q = max(1, s // 8), s // 4
    # per image: OpenCV's one-pass mean and deviation of each colour, in double (NumPy's
    # float32 reductions over a batch took 10x as long: 40 ms of 64 cells, 2-core machine)
    colour = np.array([np.concatenate(cv2.meanStdDev(img)).ravel() for img in px]).reshape(n, 6)
    strips = (px[:, :ring], px[:, -ring:], px[:, :, :ring], px[:, :, -ring:])  # equal sizes
    border = np.mean([strip.reshape(n, -1).mean(1) for strip in strips], axis=0)
    centre = px[:, q:s - q, q:s - q].reshape(n, -1).mean(1)
    x = px.astype(np.int16)
    detail = np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3))
    return (np.column_stack([colour, border, centre, detail]) / 255.0).astype(np.float32)


@dataclass(frozen=True)
class RejectOption:
    """Both distances; the OOD score of an image is the larger of the two ratios."""

    features: Mahalanobis    # the model's penultimate features
    appearance: Mahalanobis  # :func:`appearance` statistics

    def score(self, features: np.ndarray, pixels: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
        """``stats``: :func:`appearance` of ``pixels`` if the caller has it (scoring computes it
        while decoding, off the forward pass's thread)."""
        stats = appearance(pixels) if stats is None else stats
        return np.maximum(self.features.score(features), self.appearance.score(stats))

    def state(self) -> dict[str, Any]:
        return {"features": self.features.state(), "appearance": self.appearance.state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RejectOption":
        return cls(Mahalanobis.from_state(state["features"]), Mahalanobis.from_state(state["appearance"]))


def limits_state(limits: InputLimits) -> dict[str, Any]:
    return asdict(limits)


def decode_screened(data: bytes, size: int, limits: InputLimits | None
                    ) -> tuple[np.ndarray | None, str | None, str | None]:
    """Encoded bytes → (pixels resized to ``size``, error, reject reason): unreadable bytes get
    an error; a readable image the checks refuse gets a reason (its pixels are still given)."""
    from pipeline.data.images import ImageDecodeError, open_image, resize, to_rgb_array

    try:
        with open_image(data) as img:
            rgb = to_rgb_array(img)
            rejected = screen(rgb, limits, img)
    except ImageDecodeError as exc:
        return None, str(exc), None
    return resize(rgb, size), None, rejected
