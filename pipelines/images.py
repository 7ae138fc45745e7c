"""Reading images the way labels see them: decoded fully, EXIF orientation applied, RGB uint8."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import DetopsError

EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def read_rgb(source: Path | bytes, name: str | None = None) -> np.ndarray:
    """An image file (or its encoded bytes) as displayed: RGB uint8 HxWx3 after EXIF orientation.
    An undecodable image raises DetopsError naming `name` (default: the path)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            return to_rgb8(ImageOps.exif_transpose(im))
    # ImportError: ultralytics, when loaded, patches Image.open to retry undecodable bytes with the
    # optional pi_heif plugin, which is not installed.
    except (UnidentifiedImageError, OSError, SyntaxError, ImportError) as exc:
        raise DetopsError(f"image {name or source} cannot be decoded ({exc})") from None


def to_rgb8(image: Any) -> np.ndarray:
    """Any Pillow mode as an RGB uint8 HxWx3 array. 16- and 32-bit integer grey levels are scaled
    (65535 -> 255), not clipped; float images are taken as [0, 1] when they fit, else clipped to
    [0, 255]; alpha is dropped (as OpenCV, which the training pipeline reads with, does)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or grey.max(initial=0) <= 65535 else grey.max()
        grey = np.clip(grey, 0, top) * (255.0 / top)
        return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if grey.size and grey.min() >= 0 and grey.max() <= 1:
            grey = grey * 255.0
        return np.repeat(np.rint(np.clip(grey, 0, 255)).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def oriented_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (catching truncated files) and return its size as displayed, i.e.
    after the EXIF orientation, which is the size Label Studio records."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in _TRANSPOSED:
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DetopsError(f"image {path} cannot be decoded ({exc})") from None
    return width, height
