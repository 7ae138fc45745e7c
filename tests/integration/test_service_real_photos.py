"""Issue 19: /detect on the real photos of ../shared/realdata/coco128-train (`real_photos`), through the
session's `server` (tests/integration/conftest.py), against `ModelRuntime.predict` on the same model.

The server caps uploads at MAX_UPLOAD (600 kB, for its own 413 tests), above the largest photo. The
PNG and EXIF copies are of a handful of photos (the grayscale one included), halved so that a lossless
PNG stays under the server's cap: each costs a request and a prediction, and a few already show a
decoder or orientation mistake, which shifts every box.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import MAX_UPLOAD
from tests.integration.test_service import check_detect_body, post

pytestmark = pytest.mark.integration

DERIVED = ("train2017_000000000086.jpg", "train2017_000000000009.jpg", "train2017_000000000025.jpg",
           "train2017_000000000030.jpg")  # the grayscale photo, a crowded one, a tall one, a small object
PARAMS = {"conf": 0.001, "iou": 0.7, "max_det": 100}  # many boxes to compare


def _as_tuples(served: list[dict]) -> list[tuple]:
    return [(d["class_id"], d["box"], d["confidence"], d["raw_confidence"]) for d in served]


def _expected(runtime, pixels: np.ndarray) -> list[tuple]:  # noqa: ANN001
    """ModelRuntime.predict on displayed RGB pixels, as /detect's detections."""
    return [(d.class_id, {"x1": d.box.x1, "y1": d.box.y1, "x2": d.box.x2, "y2": d.box.y2}, d.confidence,
             d.raw_confidence) for d in runtime.predict([pixels], **PARAMS)[0]]


def _halved(path: Path) -> np.ndarray:
    """The photo as RGB pixels at half its size."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return np.asarray(rgb.resize((rgb.width // 2, rgb.height // 2), Image.BILINEAR))


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _exif6(pixels: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A JPEG storing `pixels` turned 90 degrees counter-clockwise with EXIF orientation 6, and the
    pixels a viewer shows for it: its stored pixels (as decoded) turned 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels))).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as stored:
        shown = np.ascontiguousarray(np.rot90(np.asarray(stored.convert("RGB")), k=-1))
    return buf.getvalue(), shown


def test_every_real_photo_is_answered(server: dict, real_photos: Path) -> None:
    from pipelines.images import oriented_size

    photos = sorted((real_photos / "images").iterdir())
    assert len(photos) == 128
    for path in photos:
        resp = post(server, "/detect", {"image": (path.name, path.read_bytes(), "image/jpeg")})
        assert resp.status_code == 200, (path.name, resp.text[:300])
        check_detect_body(resp.json(), *oriented_size(path), server["classes"])


def test_png_and_exif_rotated_copies_detect_what_the_runtime_predicts(server: dict,
                                                                      real_photos: Path) -> None:
    from serving.runtime import ModelRuntime

    runtime = ModelRuntime.load(server["model_dir"], threads=1)
    compared = 0
    for name in DERIVED:
        pixels = _halved(real_photos / "images" / name)
        exif_jpeg, shown = _exif6(pixels)
        assert shown.shape[:2] == pixels.shape[:2]
        for kind, data, expected_pixels in (("png", _png(pixels), pixels), ("exif6", exif_jpeg, shown)):
            assert len(data) <= MAX_UPLOAD, (name, kind, len(data))
            resp = post(server, "/detect", {"image": (f"{name}.{kind}", data)},
                        {k: json.dumps(v) for k, v in PARAMS.items()})
            assert resp.status_code == 200, (name, kind, resp.text[:300])
            body = resp.json()
            check_detect_body(body, pixels.shape[1], pixels.shape[0], server["classes"])
            expected = _expected(runtime, expected_pixels)
            assert _as_tuples(body["detections"]) == expected, (name, kind)
            compared += len(expected)
    assert compared >= 100, f"only {compared} boxes compared"
