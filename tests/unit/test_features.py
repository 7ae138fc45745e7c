"""Per-image features: they move the way their names say, are deterministic and cheap."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest

from labeling.synthetic import render
from monitoring.features import EMBEDDING_DIM, detection_summary, image_embedding, image_statistics
from pipelines.config.data import SynthesizeConfig
from pipelines.errors import DetopsError
from pipelines.types import Box, Detection


def _synthetic(shift: str | None = None, index: int = 0) -> np.ndarray:
    cfg = SynthesizeConfig(n_images=4, seed=3, min_side=256, max_side=416, shift=shift)
    return cv2.cvtColor(render(cfg, index).image, cv2.COLOR_BGR2RGB)


def test_statistics_follow_brightness_blur_and_colour() -> None:
    base = image_statistics(_synthetic())
    dark = image_statistics(_synthetic("dark"))
    blur = image_statistics(_synthetic("blur"))
    assert dark["brightness"] < 0.7 * base["brightness"]
    assert blur["sharpness"] < 0.5 * base["sharpness"]
    gray = np.full((50, 80, 3), 128, np.uint8)
    stats = image_statistics(gray)
    assert stats["colourfulness"] == pytest.approx(0.0) and stats["contrast"] == pytest.approx(0.0)
    assert (stats["width"], stats["height"], stats["aspect"]) == (80.0, 50.0, 1.6)
    red = np.zeros((50, 80, 3), np.uint8)
    red[..., 0] = 255
    assert image_statistics(red)["colourfulness"] > 50


def test_sharpness_does_not_grow_with_resolution() -> None:
    img = _synthetic()
    big = cv2.resize(img, None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)
    assert image_statistics(big)["sharpness"] == pytest.approx(image_statistics(img)["sharpness"], rel=0.5)


def test_embedding_is_deterministic_bounded_and_sensitive_to_background() -> None:
    a = image_embedding(_synthetic())
    assert a.shape == (EMBEDDING_DIM,) and a.dtype == np.float32
    assert np.array_equal(a, image_embedding(_synthetic()))
    assert a.min() >= 0 and a.max() <= 1
    other = image_embedding(_synthetic("dark"))
    assert np.abs(a - other).sum() > 1.0


def test_features_are_fast() -> None:
    img = _synthetic()
    t0 = time.perf_counter()
    for _ in range(20):
        image_statistics(img)
        image_embedding(img)
    assert (time.perf_counter() - t0) / 20 < 0.02  # a few ms per image, even on a busy CI machine


def test_detection_summary() -> None:
    dets = [Detection(Box(0, 0, 10, 10), 0, 0.9, 0.9), Detection(Box(0, 0, 20, 10), 0, 0.5, 0.6),
            Detection(Box(0, 0, 30, 10), 2, 0.2, 0.1)]
    s = detection_summary(dets, ["a", "b", "c"], (100, 50))
    assert s["n_detections"] == 3
    assert s["mean_confidence"] == pytest.approx(1.6 / 3)
    assert (s["min_confidence"], s["max_confidence"]) == (0.2, 0.9)
    assert (s["class_share_a"], s["class_share_b"], s["class_share_c"]) == pytest.approx((2 / 3, 0, 1 / 3))
    assert s["mean_rel_area"] == pytest.approx(0.04) and s["median_rel_area"] == pytest.approx(0.04)
    empty = detection_summary([], ["a"], (100, 50))
    assert empty["n_detections"] == 0 and empty["class_share_a"] == 0
    assert math.isnan(empty["mean_confidence"]) and math.isnan(empty["mean_rel_area"])


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32),
                                 np.zeros((0, 10, 3), np.uint8), "image.jpg"])
def test_bad_images_are_refused(bad) -> None:  # noqa: ANN001
    with pytest.raises(DetopsError, match="image"):
        image_statistics(bad)
    with pytest.raises(DetopsError, match="image"):
        image_embedding(bad)
