"""Decoding and resizing of cell images, shared by prepare, the model and scoring.

Training, evaluation and the registered model all go through
:func:`load_rgb` and :func:`resize`, so a served model sees images prepared
exactly like the ones it was trained on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Larger images are refused as likely decompression bombs (a cell crop is < 1 MP).
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message says why."""


def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an ``HxWx3`` uint8 RGB array.

    Grey-scale, palette and RGBA images are converted to RGB (alpha is composited
    on black, as the cell crops' background is black).

    Raises:
        ImageDecodeError: for empty, truncated, oversized or non-image data.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        f"image of {w}x{h} pixels exceeds the {max_pixels}-pixel limit "
                        "(possible decompression bomb)"
                    )
                img.load()
                return to_rgb_array(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a readable image: no image format (PNG, JPEG, TIFF, BMP, ...) "
                               f"recognised in its first bytes {data[:8]!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a readable image: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageDecodeError(f"corrupt image data: {exc}") from None


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL image mode to an ``HxWx3`` uint8 array."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
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
