"""Reading images the way labels see them: decoded fully, EXIF orientation applied, RGB uint8."""

from __future__ import annotations

import io
from pathlib import Path

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
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    # ImportError: ultralytics, when loaded, patches Image.open to retry undecodable bytes with the
    # optional pi_heif plugin, which is not installed.
    except (UnidentifiedImageError, OSError, SyntaxError, ImportError) as exc:
        raise DetopsError(f"image {name or source} cannot be decoded ({exc})") from None


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
