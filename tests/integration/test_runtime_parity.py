"""ModelRuntime (numpy + ONNX Runtime) against ultralytics' own predictor on the same ONNX model.

ultralytics treats an ONNX model with a dynamic batch as "dynamic" and then letterboxes to the
smallest stride-multiple rectangle when `rect=True` (its predict default); our model has a fixed
input, so the reference runs with `rect=False`, i.e. the square letterbox the model was exported for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.types import YoloDataset
from serving.runtime import MODEL_FILE, ModelRuntime

BOX_ATOL_PX = 0.5
SCORE_ATOL = 1e-4
# A 2-epoch model is unsure of everything: a very low threshold gives many boxes to compare.
CONF, IOU, MAX_DET = 1e-4, 0.7, 100


def _images(dataset: Path) -> list[np.ndarray]:
    """BGR images of different sizes and aspects: dataset images plus thin and tall crops of them."""
    import cv2

    paths = YoloDataset.load(dataset).images("val")[:4]
    images = [cv2.imread(str(p)) for p in paths]
    wide = cv2.resize(images[0], (300, 50))
    tall = cv2.resize(images[1], (71, 333))
    return [*images, wide, tall, np.ascontiguousarray(images[2][:17, :])]


@pytest.mark.integration
def test_runtime_matches_ultralytics_predictor(trained_model_dir: Path, yolo_dataset: Path) -> None:
    from ultralytics import YOLO

    runtime = ModelRuntime.load(trained_model_dir, threads=1)
    reference = YOLO(str(trained_model_dir / MODEL_FILE), task="detect")
    images = _images(yolo_dataset)
    assert len({im.shape for im in images}) == len(images)
    ours_all = runtime.predict([im[..., ::-1] .copy() for im in images], conf=CONF, iou=IOU, max_det=MAX_DET)
    compared = 0
    for bgr, ours in zip(images, ours_all):
        theirs = reference.predict(bgr, imgsz=runtime.card.imgsz, conf=CONF, iou=IOU, max_det=MAX_DET,
                                   rect=False, verbose=False)[0].boxes
        assert len(ours) == len(theirs), bgr.shape
        if not ours:
            continue
        boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in ours])
        np.testing.assert_allclose(boxes, theirs.xyxy.numpy(), rtol=0, atol=BOX_ATOL_PX)
        np.testing.assert_allclose([d.raw_confidence for d in ours], theirs.conf.numpy(), rtol=0, atol=SCORE_ATOL)
        assert [d.class_id for d in ours] == theirs.cls.numpy().astype(int).tolist()
        assert all(d.confidence == d.raw_confidence for d in ours)  # no calibrator yet
        compared += len(ours)
    assert compared >= 20, f"only {compared} boxes compared: lower CONF"


@pytest.mark.integration
def test_batched_predict_equals_one_by_one(trained_model_dir: Path, yolo_dataset: Path) -> None:
    runtime = ModelRuntime.load(trained_model_dir, threads=1)
    rgb = [im[..., ::-1].copy() for im in _images(yolo_dataset)]
    batched = runtime.predict(rgb, conf=CONF, iou=IOU, max_det=MAX_DET)
    single = [runtime.predict([im], conf=CONF, iou=IOU, max_det=MAX_DET)[0] for im in rgb]
    for a, b in zip(batched, single):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.class_id == y.class_id and abs(x.confidence - y.confidence) < 1e-5
            assert abs(x.box.x1 - y.box.x1) < 1e-2 and abs(x.box.y2 - y.box.y2) < 1e-2
