"""Decoding and resizing of cell images, shared by prepare, the model and scoring.

Training, evaluation and the registered model all go through
:func:`load_rgb` and :func:`resize`, so a served model sees images prepared
exactly like the ones it was trained on.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# Larger images are refused as likely decompression bombs (a cell crop is < 1 MP).
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message says why."""


def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an ``HxWx3`` uint8 RGB array.

    Grey-scale, palette and RGBA images are converted to RGB (alpha is composited
    on black, as the cell crops' background is black); 16-bit and floating-point
    images are mapped to 8 bits by their value range (:func:`to_rgb_array`); of a
    multi-frame file (GIF, TIFF), the first frame.

    Raises:
        ImageDecodeError: for empty, truncated, oversized or non-image data.
    """
    with open_image(data, max_pixels) as img:
        return to_rgb_array(img)


@contextlib.contextmanager
def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """The first frame of encoded image bytes as a loaded PIL image.

    Raises:
        ImageDecodeError: for empty, truncated, oversized or non-image data.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"image of {w}x{h} pixels exceeds the {max_pixels}-pixel limit "
                    "(possible decompression bomb)"
                )
            img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a readable image: no image format (PNG, JPEG, TIFF, BMP, ...) "
                               f"recognised in its first bytes {data[:8]!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a readable image: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageDecodeError(f"corrupt image data: {exc}") from None
    with img:
        yield img


# Integer modes wider than 8 bits, by the largest value their samples can hold.
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL image mode to an ``HxWx3`` uint8 array.

    Wide samples are scaled, not clipped: 16-bit (``I;16``, and ``I`` holding 16-bit data)
    by 255/65535; floating point (``F``) by its range (0..1, 0..255 or 0..65535). Pillow's
    own conversion clips them, which turns a 16-bit cell white and a 0..1 float cell black.

    Raises:
        ImageDecodeError: a floating-point image with non-finite values or outside 0..65535.
    """
    if img.mode in WIDE_MODES or img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            if not np.isfinite(grey).all():
                raise ImageDecodeError("a floating-point image with NaN or infinite values")
            top = grey.max(initial=0.0)
            if grey.min(initial=0.0) < 0 or top > 65535:
                raise ImageDecodeError(f"a floating-point image with values {grey.min():g}..{top:g}, "
                                       "outside 0..1, 0..255 and 0..65535: its scale is unknown")
            scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
        else:
            scale = 255.0 if grey.max(initial=0) <= 255 else WIDE_MODES[img.mode]
        grey = np.clip(np.rint(grey / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB array to ``size x size`` (bilinear, antialiased)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)
