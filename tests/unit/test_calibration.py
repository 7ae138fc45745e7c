"""D-ECE, matching rules and the calibrator fit on synthetic detections with known calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation.calibration import (
    CalibrationSet,
    NotEnoughCalibrationData,
    calibrated,
    calibration_set,
    dece,
    ece,
    fit_calibrator,
    match_detections,
    plot_reliability,
    reliability,
)
from pipelines.errors import DetopsError
from pipelines.types import Box, Detection
from serving.calibrator import Calibrator


def _det(x1: float, y1: float, x2: float, y2: float, cls: int = 0, conf: float = 0.5) -> Detection:
    return Detection(Box(x1, y1, x2, y2), cls, conf, conf)


def _synthetic(n: int, seed: int, overconfident: bool) -> CalibrationSet:
    """Detections on 100x100 images. Calibrated: correct with probability = confidence. Overconfident:
    the true probability is a shrunk logit of the confidence and drops towards the image's right side,
    a mapping box-aware Platt scaling can represent."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.02, 0.98, n)
    cx, cy = rng.uniform(10, 90, (2, n))
    w, h = rng.uniform(4, 20, (2, n))
    boxes = np.column_stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    if overconfident:
        logit = np.log(conf / (1 - conf))
        p = 1 / (1 + np.exp(-(0.5 * logit - 0.8 - 1.5 * (cx / 100 - 0.5))))
    else:
        p = conf
    return CalibrationSet(conf, boxes, np.full(n, 100.0), np.full(n, 100.0), rng.random(n) < p)


def test_dece_small_for_calibrated_and_large_for_overconfident():
    good = _synthetic(50_000, seed=0, overconfident=False)
    bad = _synthetic(50_000, seed=0, overconfident=True)
    assert dece(good.raw_conf, good.labels, good.box_features()) < 0.03
    assert ece(good.raw_conf, good.labels) < 0.01
    assert dece(bad.raw_conf, bad.labels, bad.box_features()) > 0.15


def test_dece_by_hand():
    # Two confidence bins: [0.1, 0.3] with labels [1, 0] -> |0.5 - 0.2| = 0.3, weight 2/3;
    # [0.9] with label 1 -> |1 - 0.9| = 0.1, weight 1/3.
    assert ece([0.1, 0.3, 0.9], [True, False, True], bins=2) == pytest.approx(0.3 * 2 / 3 + 0.1 / 3)
    # Box bins split the first bin: each detection alone -> |1-0.1| and |0-0.3|.
    feats = np.array([[0.1, 0.1, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]])
    assert dece([0.1, 0.3, 0.9], [True, False, True], feats, conf_bins=2, box_bins=2) == pytest.approx(
        (0.9 + 0.3 + 0.1) / 3)
    assert dece([], []) == 0.0


def test_dece_rejects_mismatched_inputs():
    with pytest.raises(DetopsError, match="3 confidences but 2 labels"):
        dece([0.1, 0.2, 0.3], [True, False])


def test_platt_fit_reduces_dece_on_held_out_data():
    train = _synthetic(3000, seed=1, overconfident=True)
    test = _synthetic(3000, seed=2, overconfident=True)
    calibrator = fit_calibrator(train, "platt")
    assert calibrator.method == "platt" and len(calibrator.coef) == 5
    before = dece(test.raw_conf, test.labels, test.box_features())
    after = dece(calibrated(calibrator, test), test.labels, test.box_features())
    assert after < before / 2, (before, after)


def test_isotonic_and_none(tmp_path: Path):
    train = _synthetic(3000, seed=3, overconfident=True)
    test = _synthetic(3000, seed=4, overconfident=True)
    iso = fit_calibrator(train, "isotonic")
    assert iso.method == "isotonic"
    assert ece(calibrated(iso, test), test.labels) < ece(test.raw_conf, test.labels) / 2
    iso.save(tmp_path / "calibrator.json")
    assert Calibrator.load(tmp_path / "calibrator.json") == iso
    assert fit_calibrator(train, "none") == Calibrator()
    with pytest.raises(DetopsError, match="unknown calibration method 'beta'"):
        fit_calibrator(train, "beta")


def test_fit_refuses_single_label_data():
    data = _synthetic(100, seed=5, overconfident=False)
    data.labels[:] = False
    with pytest.raises(NotEnoughCalibrationData, match="0 correct"):
        fit_calibrator(data, "platt")


def test_matching_wrong_class_never_matches_and_each_gt_once():
    truths = [(0, Box(0, 0, 10, 10))]
    # Wrong class on a perfect box: not correct.
    assert match_detections([_det(0, 0, 10, 10, cls=1, conf=0.9)], truths).tolist() == [False]
    # Two detections on one ground truth: only the more confident one is correct, whatever the order.
    dets = [_det(0, 0, 10, 9, conf=0.4), _det(0, 0, 10, 10, conf=0.8)]
    assert match_detections(dets, truths).tolist() == [False, True]
    # IoU below the threshold: not correct (IoU 0.5 exactly counts).
    assert match_detections([_det(5, 0, 15, 10)], truths, 0.5).tolist() == [False]
    assert match_detections([_det(0, 0, 10, 5)], truths, 0.5).tolist() == [True]


def test_matching_prefers_highest_iou_free_ground_truth():
    truths = [(0, Box(0, 0, 10, 10)), (0, Box(2, 0, 12, 10))]
    dets = [_det(2, 0, 12, 10, conf=0.9), _det(0, 0, 10, 10, conf=0.5)]
    assert match_detections(dets, truths).tolist() == [True, True]


def test_calibration_set_from_coco_ground_truth():
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0}],
          "categories": [{"id": 0, "name": "a"}]}
    preds = {1: [_det(0, 0, 10, 10, conf=0.9), _det(50, 20, 60, 30, conf=0.3), _det(0, 0, 5, 5, conf=0.01)]}
    data = calibration_set(preds, gt, iou_threshold=0.5, min_conf=0.1)
    assert data.labels.tolist() == [True, False]
    assert data.raw_conf.tolist() == [0.9, 0.3]
    assert data.box_features()[1] == pytest.approx([0.55, 0.5, 0.1, 0.2])
    with pytest.raises(DetopsError, match="image id 3"):
        calibration_set({3: []}, gt)


def test_reliability_diagram_written(tmp_path: Path):
    data = _synthetic(500, seed=6, overconfident=True)
    r = reliability(data.raw_conf, data.labels, bins=10)
    assert r["count"].sum() == 500
    plot_reliability({"raw": (data.raw_conf, data.labels), "calibrated": (data.raw_conf, data.labels)},
                     tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
