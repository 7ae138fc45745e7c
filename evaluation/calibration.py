"""Detection calibration: matching detections to ground truth, D-ECE (Küppers et al., CVPR-W 2020),
plain ECE, the post-hoc calibrator fit, and the reliability diagram.

A detection is "correct" (label 1) when it has the right class and IoU >= `iou_threshold` with a
ground-truth box that no higher-confidence detection has taken. D-ECE bins detections jointly over
their confidence and their box (centre cx, cy and size w, h, normalized by the image size):
`conf_bins` equal-width confidence bins times `box_bins` equal-width bins on each of cx, cy, w, h, and
D-ECE = sum over non-empty bins b of |b|/N * |precision(b) - mean confidence(b)|. With `box_bins=1` it
is the usual confidence-only ECE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import DetopsError
from pipelines.types import Box, Detection
from serving.calibrator import Calibrator, platt_features

MIN_PER_LABEL = 2  # a fit needs a few correct and a few wrong detections


class NotEnoughCalibrationData(DetopsError):
    """The fitting set lacks correct or wrong detections: nothing to learn a mapping from."""


@dataclass
class CalibrationSet:
    """Detections flattened across images: raw confidence, xyxy box in pixels, the size of its image,
    and whether it is correct."""

    raw_conf: np.ndarray
    boxes: np.ndarray
    img_w: np.ndarray
    img_h: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.raw_conf.size)

    def box_features(self) -> np.ndarray:
        """(N, 4) normalized cx, cy, w, h: the last four of `platt_features`."""
        return platt_features(self.raw_conf, self.boxes, self.img_w, self.img_h)[:, 1:]


def ground_truth_boxes(gt: dict) -> dict[int, list[tuple[int, Box]]]:
    """(class id, box) per image id of a COCO ground truth."""
    boxes: dict[int, list[tuple[int, Box]]] = {image["id"]: [] for image in gt["images"]}
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[ann["image_id"]].append((ann["category_id"], Box(x, y, x + w, y + h)))
    return boxes


def assign_detections(detections: list[Detection], truths: list[tuple[int, Box]], iou_threshold: float = 0.5,
                      *, class_aware: bool = True) -> np.ndarray:
    """Index of the ground truth each detection matches, -1 for none. Greedy by descending raw
    confidence: each detection takes the unmatched ground truth (of its class when `class_aware`) of
    highest IoU >= `iou_threshold`; each ground truth is taken once."""
    assigned = np.full(len(detections), -1, dtype=int)
    taken = [False] * len(truths)
    for i in sorted(range(len(detections)), key=lambda j: -detections[j].raw_confidence):
        det = detections[i]
        best, best_iou = -1, iou_threshold
        for g, (cls, box) in enumerate(truths):
            if taken[g] or (class_aware and cls != det.class_id):
                continue
            iou = det.box.iou(box)
            if iou >= best_iou:
                best, best_iou = g, iou
        if best >= 0:
            taken[best] = True
            assigned[i] = best
    return assigned


def match_detections(detections: list[Detection], truths: list[tuple[int, Box]],
                     iou_threshold: float = 0.5) -> np.ndarray:
    """Correct (True) or not, per detection in the given order: right class, IoU >= `iou_threshold`
    with a ground truth no more confident detection took (see `assign_detections`)."""
    return assign_detections(detections, truths, iou_threshold) >= 0


def calibration_set(predictions: dict[int, list[Detection]], gt: dict, *, iou_threshold: float = 0.5,
                    min_conf: float = 0.0) -> CalibrationSet:
    """Match the predictions (keyed by image id of the COCO ground truth `gt`) and keep those with
    raw confidence >= `min_conf`. Filtering before matching changes nothing: greedy matching visits
    higher confidences first."""
    truths = ground_truth_boxes(gt)
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    conf, boxes, widths, heights, labels = [], [], [], [], []
    for image_id, detections in predictions.items():
        if image_id not in sizes:
            raise DetopsError(f"predictions for image id {image_id}, which is not in the ground truth")
        kept = [d for d in detections if d.raw_confidence >= min_conf]
        labels.append(match_detections(kept, truths[image_id], iou_threshold))
        conf.extend(d.raw_confidence for d in kept)
        boxes.extend((d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in kept)
        widths.extend([sizes[image_id][0]] * len(kept))
        heights.extend([sizes[image_id][1]] * len(kept))
    return CalibrationSet(np.asarray(conf, dtype=np.float64),
                          np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                          np.asarray(widths, dtype=np.float64), np.asarray(heights, dtype=np.float64),
                          np.concatenate(labels) if labels else np.zeros(0, dtype=bool))


def _bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1]; 1.0 falls in the last bin, values outside are clipped."""
    return np.clip((np.asarray(values) * bins).astype(int), 0, bins - 1)


def dece(confidence: np.ndarray, labels: np.ndarray, box_features: np.ndarray | None = None, *,
         conf_bins: int = 10, box_bins: int = 2) -> float:
    """Detection expected calibration error over joint confidence x (cx, cy, w, h) bins; 0.0 for no
    detections. `box_features` (N, 4) are normalized; None (or `box_bins=1`) gives confidence-only ECE."""
    confidence = np.asarray(confidence, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if confidence.shape != labels.shape:
        raise DetopsError(f"{confidence.size} confidences but {labels.size} labels")
    if conf_bins < 1 or box_bins < 1:
        raise DetopsError(f"bin counts must be >= 1 (got conf_bins={conf_bins}, box_bins={box_bins})")
    if confidence.size == 0:
        return 0.0
    key = _bin_index(confidence, conf_bins)
    if box_features is not None and box_bins > 1:
        features = np.asarray(box_features, dtype=np.float64).reshape(-1, 4)
        for column in features.T:
            key = key * box_bins + _bin_index(column, box_bins)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    precision = np.bincount(inverse, weights=labels) / counts
    mean_conf = np.bincount(inverse, weights=confidence) / counts
    return float(np.sum(counts / confidence.size * np.abs(precision - mean_conf)))


def ece(confidence: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Confidence-only expected calibration error (what the reliability diagram shows)."""
    return dece(confidence, labels, None, conf_bins=bins, box_bins=1)


def reliability(confidence: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per confidence bin: lower edge, mean confidence, precision and count (NaN where empty)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    index = _bin_index(confidence, bins)
    counts = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=np.asarray(labels, dtype=float), minlength=bins) / counts
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
    return {"lower": np.arange(bins) / bins, "confidence": mean_conf, "accuracy": accuracy, "count": counts}


def fit_calibrator(data: CalibrationSet, method: str) -> Calibrator:
    """Fit a `serving.calibrator.Calibrator` on matched detections: `platt` (box-aware logistic
    regression on `platt_features`), `isotonic` (monotone map of the raw confidence) or `none`."""
    if method == "none":
        return Calibrator()
    if method not in ("platt", "isotonic"):
        raise DetopsError(f"unknown calibration method {method!r} (platt, isotonic or none)")
    n_pos = int(np.sum(data.labels))
    if n_pos < MIN_PER_LABEL or len(data) - n_pos < MIN_PER_LABEL:
        raise NotEnoughCalibrationData(
            f"cannot fit a {method} calibrator on {len(data)} detections ({n_pos} correct): at least "
            f"{MIN_PER_LABEL} correct and {MIN_PER_LABEL} wrong are needed")
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        features = platt_features(data.raw_conf, data.boxes, data.img_w, data.img_h)
        # Default L2 (C=1) keeps the 6 parameters sane on the few hundred detections of a val split.
        model = LogisticRegression(C=1.0, max_iter=1000).fit(features, data.labels.astype(int))
        return Calibrator(method="platt", coef=model.coef_[0].tolist(), intercept=float(model.intercept_[0]))
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(data.raw_conf,
                                                                             data.labels.astype(float))
    return Calibrator(method="isotonic", x_thresholds=model.X_thresholds_.tolist(),
                      y_thresholds=model.y_thresholds_.tolist())


def calibrated(calibrator: Calibrator, data: CalibrationSet) -> np.ndarray:
    """The calibrator's confidences for the detections of `data` (what serving would report)."""
    return calibrator.apply(data.raw_conf, data.boxes, data.img_w, data.img_h).astype(np.float64)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 10) -> None:
    """Reliability diagram PNG, one panel per entry of `curves` (title -> (confidence, labels)):
    precision per confidence bin as bars against the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 5), squeeze=False)
    for ax, (title, (conf, labels)) in zip(axes[0], curves.items()):
        r = reliability(conf, labels, bins)
        filled = r["count"] > 0
        ax.bar(r["lower"][filled], r["accuracy"][filled], width=1 / bins, align="edge",
               edgecolor="black", alpha=0.7, label="precision")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.plot(r["confidence"][filled], r["accuracy"][filled], "o", color="tab:red", label="mean confidence")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="precision",
               title=f"{title} (ECE {ece(conf, labels, bins):.3f}, n={len(conf)})")
        ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
