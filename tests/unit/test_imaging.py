"""serving/imaging.py: what is refused (with which code and status) and how odd images are decoded."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from pipelines.images import read_rgb, to_rgb8
from serving.imaging import RequestRejected, decode_image
from tests.fixtures import images

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 4_000_000}


def rejected(data: bytes, **limits: int) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        decode_image(data, **{**LIMITS, **limits})
    return info.value


@pytest.mark.parametrize(("data", "code", "status"), [
    (b"", "empty_file", 400),
    (images.TEXT, "not_an_image", 415),
    (images.truncated_jpeg(), "corrupt_image", 422),
    (images.png_header_only(50_000, 50_000), "too_many_pixels", 422),
    (images.png_header_only(3000, 2000), "too_many_pixels", 422),  # under Pillow's own bomb limit
])
def test_bad_files_are_refused_with_a_named_reason(data: bytes, code: str, status: int) -> None:
    exc = rejected(data)
    assert (exc.code, exc.status) == (code, status)
    assert exc.detail.startswith("image: ")


def test_oversized_upload_names_the_limit() -> None:
    exc = rejected(images.png(64, 64), max_bytes=100)
    assert (exc.code, exc.status) == ("file_too_large", 413)
    assert "100 bytes" in exc.detail and "serve.max_upload_bytes" in exc.detail


def test_bomb_header_is_refused_without_decoding() -> None:
    tracemalloc.start()
    rejected(images.png_header_only(50_000, 50_000), max_pixels=10**12)  # Pillow's own bomb check
    rejected(images.png_header_only(20_000, 20_000), max_pixels=1000)  # ours, from the header
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000  # 20000x20000 RGB would be 1.2 GB


def test_format_comes_from_the_bytes_not_the_name() -> None:
    exc = rejected(b"GIF87a" + b"\0" * 3)  # a GIF signature with nothing behind it
    assert exc.code in ("corrupt_image", "not_an_image")
    assert decode_image(images.png(10, 8), **LIMITS).format == "PNG"


def test_unsupported_format_is_refused() -> None:
    buf = io.BytesIO()
    Image.fromarray(images.noise(8, 8)).save(buf, "PPM")
    exc = rejected(buf.getvalue())
    assert (exc.code, exc.status) == ("unsupported_format", 415)
    assert "PPM" in exc.detail


def test_jpeg_decodes_to_rgb_with_sha256() -> None:
    import hashlib

    data = images.jpeg(96, 64)
    out = decode_image(data, **LIMITS)
    assert out.rgb.shape == (64, 96, 3) and out.rgb.dtype == np.uint8
    assert (out.width, out.height) == (96, 64)
    assert out.sha256 == hashlib.sha256(data).hexdigest()


def test_exif_orientation_is_applied() -> None:
    out = decode_image(images.exif_rotated_jpeg(80, 40), **LIMITS)
    assert (out.width, out.height) == (40, 80)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    data, values = images.png16()
    out = decode_image(data, **LIMITS)
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(out.rgb[..., 0], expected)
    assert np.array_equal(out.rgb[..., 0], out.rgb[..., 2])
    assert out.rgb.min() == 0 and out.rgb.max() == 255  # the full range survives
    # Evaluation, the drift reference and the pyfunc model read files with the same conversion.
    assert np.array_equal(read_rgb(data), out.rgb)


@pytest.mark.parametrize("data", [images.cmyk_jpeg(), images.rgba_png(), images.one_pixel_png()])
def test_other_modes_become_rgb(data: bytes) -> None:
    out = decode_image(data, **LIMITS)
    assert out.rgb.ndim == 3 and out.rgb.shape[2] == 3 and out.rgb.dtype == np.uint8


def test_rgba_drops_alpha_keeping_colour() -> None:
    rgba = np.dstack([images.noise(6, 4), np.full((4, 6), 10, np.uint8)])
    assert np.array_equal(to_rgb8(Image.fromarray(rgba, "RGBA")), rgba[..., :3])


def test_animated_gif_gives_its_first_frame() -> None:
    data = images.animated_gif(40, 30, frames=3)
    with Image.open(io.BytesIO(data)) as im:
        first = np.asarray(im.convert("RGB"))
        assert im.n_frames == 3
    out = decode_image(data, **LIMITS)
    assert np.array_equal(out.rgb, first)
