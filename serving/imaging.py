"""Upload validation and decoding: untrusted bytes in, an 8-bit RGB array out, or an `RequestRejected`
that names the problem and carries the HTTP status to answer with.

The order matters: size of the upload, then the format sniffed from the bytes (never the file name or
the content type), then the pixel count read from the header, and only then the decode, so that a
decompression bomb is refused before anything is allocated for its pixels.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.images import to_rgb8

log = logging.getLogger(__name__)

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})  # MPO: multi-frame JPEG
# A truncated file must be an error, not an image silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class RequestRejected(Exception):
    """A request refused (a bad upload, most often): `code` is a stable machine-readable reason, `detail` a human message,
    `status` the HTTP status to answer with; `retry_after` (seconds) becomes a Retry-After header."""

    def __init__(self, code: str, detail: str, status: int = 422, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class DecodedImage:
    """An accepted upload: RGB uint8 HxWx3 pixels (EXIF orientation applied), the SHA-256 of the bytes
    as uploaded, and the format found in them."""

    rgb: np.ndarray
    sha256: str
    format: str

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def check_size(n_bytes: int, max_bytes: int, name: str = "image") -> None:
    """Refuse an empty upload (400) or one larger than `max_bytes` (413)."""
    if n_bytes == 0:
        raise RequestRejected("empty_file", f"{name}: the uploaded file is empty (0 bytes)", 400)
    if n_bytes > max_bytes:
        raise RequestRejected("file_too_large",
                            f"{name}: {n_bytes} bytes is over the limit of {max_bytes} bytes (serve.max_upload_bytes)",
                            413)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> DecodedImage:
    """Validate and decode one uploaded file. Raises `RequestRejected` for anything that is not a
    complete image of an allowed format within the size and pixel limits."""
    check_size(len(data), max_bytes, name)
    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) above its own limit; our max_pixels check decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise RequestRejected("too_many_pixels", f"{name}: {exc}", 422) from None
        except UnidentifiedImageError:
            raise RequestRejected("not_an_image",
                                f"{name}: not a recognisable image (allowed formats: {_allowed()})", 415) from None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's plugins raise these on bad headers
            raise RequestRejected("corrupt_image", f"{name}: unreadable image header ({exc})", 422) from None
        with image:
            if image.format not in ALLOWED_FORMATS:
                raise RequestRejected("unsupported_format",
                                    f"{name}: {image.format} images are not accepted (allowed: {_allowed()})", 415)
            width, height = image.size
            if width < 1 or height < 1:
                raise RequestRejected("corrupt_image", f"{name}: the header says {width}x{height} pixels", 422)
            if width * height > max_pixels:
                raise RequestRejected("too_many_pixels",
                                    f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
                                    f"{max_pixels} (serve.max_pixels)", 422)
            try:
                image.seek(0)  # animated GIF/WEBP/TIFF: the first frame
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise RequestRejected("corrupt_image", f"{name}: cannot decode the {image.format} data ({exc})",
                                    422) from None
            rgb = to_rgb8(_oriented(image, name))
    return DecodedImage(rgb=rgb, sha256=hashlib.sha256(data).hexdigest(), format=image.format)


def decode_rgb(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> np.ndarray:
    """`decode_image(...).rgb`, a module-level function so that `functools.partial(decode_rgb, data, ...)`
    pickles: the prediction log's featurizer process decodes a cache hit's image with it, only when it
    forgot that image's features."""
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name).rgb


def _oriented(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation so boxes refer to the image as people see it. A broken EXIF block
    is not worth refusing the pixels for: the image is then used as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow raises assorted types on malformed EXIF
        log.warning("%s: EXIF orientation ignored (%s: %s)", name, type(exc).__name__, exc)
        return image


def _allowed() -> str:
    return ", ".join(sorted(ALLOWED_FORMATS - {"MPO"}))
