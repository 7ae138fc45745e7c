"""Schemathesis hooks for tests/integration/test_access.py (SCHEMATHESIS_HOOKS=tests.integration.schemathesis_hooks):
half of the generated uploads carry real images (JPEG, PNG, greyscale, RGBA, several sizes), so the
fuzzer reaches decoding, inference and the job store, not only the 4xx of random bytes."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import schemathesis
from PIL import Image


def _images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i, (size, mode, fmt) in enumerate([((64, 48), "RGB", "JPEG"), ((200, 120), "RGB", "PNG"),
                                           ((33, 97), "L", "PNG"), ((128, 128), "RGBA", "PNG"),
                                           ((320, 240), "RGB", "JPEG"), ((17, 17), "RGB", "WEBP")]):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
        img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


IMAGES = _images()


def _pick(seed: object) -> bytes | None:
    """A real image for about half the cases, chosen from the generated value (deterministic)."""
    digest = hashlib.sha256(repr(seed).encode()).digest()
    return IMAGES[digest[1] % len(IMAGES)] if digest[0] % 2 == 0 else None


@schemathesis.hook
def before_call(context, case, kwargs):  # noqa: ANN001, ANN201 (schemathesis' hook signature)
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("image"), (bytes, str)):
        real = _pick(body["image"])
        if real is not None:
            body["image"] = real
    images = body.get("images")
    if isinstance(images, list) and images:
        real = _pick(images)
        if real is None:
            return
        if all(isinstance(x, dict) for x in images):  # POST /jobs as JSON
            for x in images:
                x["data"] = base64.b64encode(real).decode()
        else:
            body["images"] = [real] * len(images)
