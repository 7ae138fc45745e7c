"""COCO metrics on hand-built cases with known answers, cross-checked against pycocotools directly."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.coco import (
    PerImageEval,
    bootstrap_map_delta,
    coco_detections,
    coco_ground_truth,
    coco_metrics,
    image_ids,
)
from pipelines.errors import DetopsError
from pipelines.types import Box, Detection, YoloDataset, YoloLabel, write_yolo_labels

CLASSES = ["square", "circle", "triangle"]


def _gt(boxes_per_image: list[list[tuple[int, list[float]]]], size: int = 200) -> dict:
    """A COCO ground truth from (class id, xywh) per image."""
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        for cls, xywh in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cls, "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": k, "name": n} for k, n in enumerate(CLASSES)]}


def _perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 0.9} for a in gt["annotations"]]


def _random_gt(n_images: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    per_image = []
    for _ in range(n_images):
        boxes = []
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, 120, 2)
            w, h = rng.uniform(10, 80, 2)
            boxes.append((int(rng.integers(0, 3)), [float(x), float(y), float(w), float(h)]))
        per_image.append(boxes)
    return _gt(per_image)


def _noisy(gt: dict, seed: int) -> list[dict]:
    """Jittered boxes, some wrong classes, some misses, some false positives, random scores."""
    rng = np.random.default_rng(seed)
    dt = []
    for a in gt["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
        cls = a["category_id"] if rng.random() > 0.1 else int((a["category_id"] + 1) % 3)
        dt.append({"image_id": a["image_id"], "category_id": cls,
                   "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)],
                   "score": float(rng.uniform(0.05, 1))})
    for image in gt["images"]:
        for _ in range(rng.integers(0, 3)):
            dt.append({"image_id": image["id"], "category_id": int(rng.integers(0, 3)),
                       "bbox": [*rng.uniform(0, 150, 2).tolist(), *rng.uniform(5, 50, 2).tolist()],
                       "score": float(rng.uniform(0.01, 0.6))})
    return dt


def _pycocotools_stats(gt: dict, dt: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in dt]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


SMALL_GT = _gt([[(0, [10, 10, 50, 50]), (1, [100, 100, 40, 60])], [(2, [20, 30, 20, 20])], []])


def test_perfect_predictions_give_map_one():
    m = coco_metrics(SMALL_GT, _perfect(SMALL_GT))
    assert m.map50_95 == pytest.approx(1.0)
    assert m.map50 == pytest.approx(1.0) and m.map75 == pytest.approx(1.0)
    assert m.ar100 == pytest.approx(1.0)
    assert all(c["ap50_95"] == pytest.approx(1.0) for c in m.per_class.values())
    # 20x20 = 400 px² is "small", 50x50 and 40x60 are "medium", nothing is "large".
    assert m.size["small"]["ap"] == pytest.approx(1.0)
    assert m.size["large"]["ap"] is None


def test_no_predictions_give_zero_and_keep_absent_buckets_none():
    m = coco_metrics(SMALL_GT, [])
    assert (m.map50_95, m.map50, m.map75, m.ar100) == (0.0, 0.0, 0.0, 0.0)
    assert m.per_class["circle"] == {"ap50_95": 0.0, "ap50": 0.0, "n_gt": 1}
    assert m.size["medium"]["ap"] == 0.0 and m.size["large"]["ap"] is None


def test_mixed_case_matches_pycocotools_called_directly():
    gt = _random_gt(30, seed=3)
    dt = _noisy(gt, seed=4)
    stats = _pycocotools_stats(gt, dt)
    m = coco_metrics(gt, dt)
    assert 0.1 < m.map50_95 < 0.9  # a genuinely mixed case, neither perfect nor empty
    assert m.map50_95 == pytest.approx(stats[0])
    assert m.map50 == pytest.approx(stats[1])
    assert m.map75 == pytest.approx(stats[2])
    assert (m.ar1, m.ar10, m.ar100) == pytest.approx((stats[6], stats[7], stats[8]))
    assert m.size["medium"]["ap"] == pytest.approx(stats[4])
    assert m.precision.shape == (10, 101, 3)


def test_poorly_localized_box_counts_at_iou_50_only():
    # IoU of the shifted box with the ground truth: 40*50 / (2*2500 - 2000) = 0.667.
    gt = _gt([[(0, [10, 10, 50, 50])]])
    dt = [{"image_id": 1, "category_id": 0, "bbox": [20, 10, 50, 50], "score": 0.8}]
    m = coco_metrics(gt, dt)
    assert m.map50 == pytest.approx(1.0)
    assert m.map75 == pytest.approx(0.0)
    assert m.map50_95 == pytest.approx(0.4)  # matched at IoU .50 .55 .60 .65 of 10 thresholds


def test_wrong_class_is_a_miss_and_class_ids_map_to_names():
    gt = _gt([[(1, [10, 10, 50, 50])]])
    wrong = [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 50, 50], "score": 0.9}]
    assert coco_metrics(gt, wrong).map50_95 == 0.0
    m = coco_metrics(gt, [{**wrong[0], "category_id": 1}])
    assert m.per_class["circle"]["ap50_95"] == pytest.approx(1.0)
    assert m.per_class["square"] == {"ap50_95": None, "ap50": None, "n_gt": 0}


def test_ground_truth_and_detections_from_a_yolo_dataset(tmp_path: Path):
    ds = YoloDataset(tmp_path, CLASSES, splits=("test",))
    ds.write_yaml()
    ds.image_dir("test").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(ds.image_dir("test") / "a.png")
    write_yolo_labels(ds.label_dir("test") / "a.txt", [YoloLabel(2, 0.5, 0.5, 0.2, 0.4)])
    gt = coco_ground_truth(YoloDataset.load(tmp_path), "test")
    assert gt["images"] == [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}]
    ann = gt["annotations"][0]
    assert ann["category_id"] == 2 and ann["id"] == 1 and ann["iscrowd"] == 0
    assert ann["bbox"] == pytest.approx([80, 30, 40, 40]) and ann["area"] == pytest.approx(1600)
    assert [c["name"] for c in gt["categories"]] == CLASSES
    det = Detection(Box(80, 30, 120, 70), class_id=2, confidence=0.3, raw_confidence=0.7)
    dt = coco_detections({image_ids(gt)["a.png"]: [det]}, gt)
    assert dt == [{"image_id": 1, "category_id": 2, "bbox": pytest.approx([80, 30, 40, 40]),
                   "score": pytest.approx(0.7)}]  # mAP ranks by the raw model score
    assert coco_metrics(gt, dt).per_class["triangle"]["ap50_95"] == pytest.approx(1.0)


def test_bad_inputs_are_named():
    det = Detection(Box(0, 0, 1, 1), class_id=7, confidence=0.5, raw_confidence=0.5)
    with pytest.raises(DetopsError, match="class id 7"):
        coco_detections({1: [det]}, SMALL_GT)
    with pytest.raises(DetopsError, match="image id 99"):
        coco_detections({99: []}, SMALL_GT)
    with pytest.raises(DetopsError, match="not in the ground truth"):
        coco_metrics(SMALL_GT, [{"image_id": 42, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 1.0}])


def test_reaccumulation_reproduces_cocoeval():
    gt = _random_gt(40, seed=5)
    dt = _noisy(gt, seed=6)
    assert PerImageEval(gt, dt).map50_95() == pytest.approx(coco_metrics(gt, dt).map50_95, abs=1e-12)
    # Weighting an image twice equals evaluating a dataset where it appears twice.
    doubled = _gt([[(a["category_id"], a["bbox"]) for a in gt["annotations"] if a["image_id"] == i["id"]]
                   for i in gt["images"] + gt["images"][:1]])
    dt_doubled = dt + [{**d, "image_id": 41} for d in dt if d["image_id"] == 1]
    weights = np.ones(40)
    weights[0] = 2
    assert PerImageEval(gt, dt).map50_95(weights) == pytest.approx(coco_metrics(doubled, dt_doubled).map50_95,
                                                                   abs=1e-9)


def test_bootstrap_identical_is_zero_and_perfect_vs_empty_is_one():
    gt = _random_gt(100, seed=7)
    dt = _noisy(gt, seed=8)
    start = time.perf_counter()
    delta, lo, hi = bootstrap_map_delta(gt, dt, dt, n=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert delta == 0.0 and lo <= 0.0 <= hi
    assert elapsed < 30, f"bootstrap of 1000 resamples on 100 images took {elapsed:.1f}s"
    delta, lo, hi = bootstrap_map_delta(gt, [], _perfect(gt), n=200, seed=0)
    assert delta == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    delta, lo, hi = bootstrap_map_delta(gt, dt, _perfect(gt), n=200, seed=0)
    assert lo < delta < hi and lo > 0


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(DetopsError, match="n=0"):
        bootstrap_map_delta(SMALL_GT, [], [], n=0)


def test_false_positives_on_background_images_are_counted():
    """Images without any ground-truth box: detections above conf on them, and on how many."""
    from evaluation.coco import background_detections

    gt = _gt([[(0, [10, 10, 50, 50])], [], []])  # image 1 has a box; 2 and 3 are background

    def det(confidence: float) -> Detection:
        return Detection(Box(0, 0, 10, 10), 0, confidence, confidence)

    predictions = {1: [det(0.9), det(0.8)], 2: [det(0.5), det(0.05)], 3: [det(0.01)]}
    assert background_detections(predictions, gt, 0.001) == {"images": 2, "detections": 3,
                                                             "images_with_detections": 2}
    assert background_detections(predictions, gt, 0.25) == {"images": 2, "detections": 1,
                                                            "images_with_detections": 1}
    assert background_detections({}, _gt([[(0, [10, 10, 50, 50])]]), 0.0)["images"] == 0
