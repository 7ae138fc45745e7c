"""Per-image features shared by the prediction log, the reference profile and the drift report.

Everything here is cheap (a few ms per image), offline and deterministic, so serving can afford it
after every prediction and the reference profile (built on the test split) is computed exactly the
same way as the live window it is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.errors import DetopsError
from pipelines.types import Detection

STAT_SIDE = 256  # statistics are taken on a gray image downscaled to at most this side
THUMB_SIDE = 4  # embedding thumbnail: 4x4 pixels x 3 channels = 48 values
HIST_BINS = 8  # embedding hue histogram bins
EMBEDDING_DIM = THUMB_SIDE * THUMB_SIDE * 3 + HIST_BINS + 2  # + saturation and value means


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        got = f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', type(rgb).__name__)}"
        raise DetopsError(f"expected an RGB uint8 image of shape (H, W, 3), got {got}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DetopsError(f"empty image of shape {rgb.shape}")


def _downscale(image: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    # INTER_AREA averages pixels: the downscaled statistics do not depend on aliasing.
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def image_statistics(rgb: np.ndarray) -> dict[str, float]:
    """Brightness, contrast, sharpness, colourfulness and size of one RGB uint8 image.

    brightness and contrast are the mean and standard deviation of the gray levels (0-255);
    sharpness is the variance of the Laplacian of the gray image downscaled to at most 256 px (so it
    does not grow with resolution); colourfulness is Hasler & Süsstrunk's (2003) metric.
    """
    _check_rgb(rgb)
    return _statistics(rgb.shape, _downscale(rgb, STAT_SIDE))


def image_embedding(rgb: np.ndarray) -> np.ndarray:
    """A 58-dim float32 appearance vector: a 4x4 RGB thumbnail, an 8-bin hue histogram weighted by
    saturation, and the mean saturation and value, all in [0, 1], taken on the image downscaled to
    at most 256 px and then 64 px.

    Why not a backbone embedding: serving has no torch, this costs well under a millisecond and is
    the same on every machine. Its limit: it sees global colour and coarse layout (lighting,
    background, colour casts), not semantics; a new object class with familiar colours or a change
    of object scale barely moves it — the per-image statistics and prediction summaries cover those.
    """
    _check_rgb(rgb)
    return _embedding(_downscale(rgb, STAT_SIDE))


def image_features(rgb: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """`image_statistics` and `image_embedding` of one image, from one downscale (the area
    downscale of the full image is most of their cost: this is what the prediction log runs)."""
    _check_rgb(rgb)
    small = _downscale(rgb, STAT_SIDE)
    return _statistics(rgb.shape, small), _embedding(small)


def _statistics(shape: tuple[int, ...], small: np.ndarray) -> dict[str, float]:
    import cv2

    h, w = shape[:2]
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    # cv2.meanStdDev rather than numpy reductions: this runs after every served prediction. The
    # 3x3 Laplacian of 8-bit levels is an exact integer in int16 (half the bytes of float32).
    (brightness,), (contrast,) = cv2.meanStdDev(gray)
    _, (laplacian_std,) = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))
    channels = small.astype(np.float32)
    r, g, b = channels[..., 0], channels[..., 1], channels[..., 2]
    (rg_mean,), (rg_std,) = cv2.meanStdDev(r - g)
    (yb_mean,), (yb_std,) = cv2.meanStdDev(0.5 * (r + g) - b)
    colourfulness = float(np.hypot(rg_std[0], yb_std[0]) + 0.3 * np.hypot(rg_mean[0], yb_mean[0]))
    return {
        "brightness": float(brightness[0]),
        "contrast": float(contrast[0]),
        "sharpness": float(laplacian_std[0] ** 2),
        "colourfulness": colourfulness,
        "width": float(w),
        "height": float(h),
        "aspect": float(w / h),
    }


def _embedding(small: np.ndarray) -> np.ndarray:
    import cv2

    tiny = _downscale(small, 64)
    thumb = cv2.resize(tiny, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    hsv = cv2.cvtColor(tiny, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float32)
    hue, sat, val = hsv[:, 0] / 180.0, hsv[:, 1] / 255.0, hsv[:, 2] / 255.0
    hist, _ = np.histogram(hue, bins=HIST_BINS, range=(0.0, 1.0), weights=sat)
    hist = hist / max(float(sat.sum()), 1e-6)
    return np.concatenate([thumb.ravel(), hist, [sat.mean(), val.mean()]]).astype(np.float32)


def detection_summary(detections: Sequence[Detection], class_names: Sequence[str],
                      image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Summary of one image's predictions: count, confidence mean/min/max, share of each class
    (`class_share_<name>`) and mean/median box area relative to the image (`image_size` = (width,
    height); without it the relative areas are NaN). Empty predictions give 0 counts/shares and NaN
    confidences and areas (Evidently ignores NaN)."""
    n = len(detections)
    out: dict[str, float] = {"n_detections": float(n)}
    conf = np.array([d.confidence for d in detections], dtype=np.float64)
    out["mean_confidence"] = float(conf.mean()) if n else float("nan")
    out["min_confidence"] = float(conf.min()) if n else float("nan")
    out["max_confidence"] = float(conf.max()) if n else float("nan")
    for i, name in enumerate(class_names):
        out[f"class_share_{name}"] = sum(d.class_id == i for d in detections) / n if n else 0.0
    if n and image_size is not None:
        areas = np.array([d.box.area for d in detections]) / float(image_size[0] * image_size[1])
        out["mean_rel_area"], out["median_rel_area"] = float(areas.mean()), float(np.median(areas))
    else:
        out["mean_rel_area"] = out["median_rel_area"] = float("nan")
    return out
