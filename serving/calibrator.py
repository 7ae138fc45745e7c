"""Confidence calibration as the runtime applies it. Fitting lives in evaluation/calibration.py.

A calibrator maps a detection's raw confidence (and where/how big its box is) to the probability that
it is a correct detection (right class, IoU >= 0.5 with an unmatched ground-truth box). It is a JSON
file shipped next to the ONNX model, so evaluation, the registry's pyfunc model and serving apply the
very same mapping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipelines.errors import DetopsError

_EPS = 1e-6
PLATT_FEATURES = 5  # logit(confidence), box centre x/y, box width/height


def platt_features(raw_conf: np.ndarray, boxes_xyxy: np.ndarray, img_w: np.ndarray | float,
                   img_h: np.ndarray | float) -> np.ndarray:
    """Features of the box-aware Platt scaling: logit(confidence), then the box centre and size
    normalized by the image size (detection calibration errors depend on position and scale)."""
    conf = np.clip(np.asarray(raw_conf, dtype=np.float64), _EPS, 1 - _EPS)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    w = np.asarray(img_w, dtype=np.float64)
    h = np.asarray(img_h, dtype=np.float64)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / w
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / h
    bw = (boxes[:, 2] - boxes[:, 0]) / w
    bh = (boxes[:, 3] - boxes[:, 1]) / h
    return np.column_stack([np.log(conf / (1 - conf)), cx, cy, bw, bh])


@dataclass
class Calibrator:
    """`identity`, `platt` (logistic regression on `platt_features`) or `isotonic` (piecewise-linear
    monotone map of the raw confidence)."""

    method: Literal["identity", "platt", "isotonic"] = "identity"
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0
    x_thresholds: list[float] = field(default_factory=list)
    y_thresholds: list[float] = field(default_factory=list)

    def apply(self, raw_conf: np.ndarray, boxes_xyxy: np.ndarray, img_w: np.ndarray | float,
              img_h: np.ndarray | float) -> np.ndarray:
        """Calibrated confidences, same shape as `raw_conf`."""
        raw_conf = np.asarray(raw_conf, dtype=np.float64)
        if self.method == "identity" or raw_conf.size == 0:
            return raw_conf.astype(np.float32)
        if self.method == "platt":
            z = platt_features(raw_conf, boxes_xyxy, img_w, img_h) @ np.asarray(self.coef) + self.intercept
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        if self.method == "isotonic":
            return np.interp(raw_conf, self.x_thresholds, self.y_thresholds).astype(np.float32)
        raise ValueError(f"unknown calibration method {self.method!r}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Calibrator:
        """Read a calibrator file; a missing file means no calibration (identity)."""
        if not path.exists():
            return cls()
        try:
            calibrator = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError, OSError) as exc:  # bad JSON (a ValueError), unknown or missing keys
            raise DetopsError(f"{path}: not a calibrator file ({exc})") from None
        # Checked at load time, so a bad file stops the service at start, not every request later.
        if calibrator.method == "platt" and len(calibrator.coef) != PLATT_FEATURES:
            raise DetopsError(f"{path}: platt needs {PLATT_FEATURES} coefficients, got {len(calibrator.coef)}")
        if calibrator.method == "isotonic" and (not calibrator.x_thresholds
                                                or len(calibrator.x_thresholds) != len(calibrator.y_thresholds)):
            raise DetopsError(f"{path}: isotonic needs matching, non-empty x_thresholds and y_thresholds")
        if calibrator.method not in ("identity", "platt", "isotonic"):
            raise DetopsError(f"{path}: unknown calibration method {calibrator.method!r}")
        return calibrator
