"""Issue 19's parity check: a model brought in by `detops import` predicts what ultralytics' own
`predict` predicts on the same ONNX file and the same images (test_own_model.py, and the mutants of
tests/mutants/own_data.py that must fail it).

Both sides read the image files themselves (ultralytics through OpenCV, detops through Pillow with EXIF
orientation): the comparison is of the whole path from file to boxes, so a decoder difference is part of
what the tolerance allows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.types import Box, Detection

# Issue 19's bar.
CONF, IOU, MAX_DET = 0.001, 0.7, 300
MIN_MATCHED = 0.99
MIN_BOX_IOU = 0.99
MAX_CONF_DIFF = 1e-3
MAX_MAP_DIFF = 0.005


@dataclass(frozen=True)
class Parity:
    """How two prediction sets of the same images agree."""

    boxes: int  # the larger of the two sets' box counts, summed over images
    matched: int
    unmatched_images: list[str]  # images where some box found no partner
    map_ours: float
    map_theirs: float

    @property
    def share(self) -> float:
        return self.matched / self.boxes if self.boxes else 1.0


def yolo_export(weights: Path, out: Path) -> Path:
    """`yolo export format=onnx` with its default settings (static batch 1, the training size), on a
    copy of `weights` in `out` (ultralytics writes the ONNX next to the weights)."""
    import shutil

    from ultralytics import YOLO

    out.mkdir(parents=True, exist_ok=True)
    copy = Path(shutil.copy2(weights, out / "best.pt"))
    return Path(YOLO(str(copy)).export(format="onnx"))


def ultralytics_predictions(onnx_path: Path, paths: list[Path]) -> list[list[Detection]]:
    """ultralytics' `predict` of an ONNX file, image file by image file, at the parity thresholds."""
    from ultralytics import YOLO

    model = YOLO(str(onnx_path), task="detect")
    out = []
    for path in paths:
        boxes = model.predict(str(path), conf=CONF, iou=IOU, max_det=MAX_DET, verbose=False)[0].boxes
        out.append([Detection(Box(*map(float, xyxy)), int(c), float(s), float(s))
                    for xyxy, c, s in zip(boxes.xyxy.numpy(), boxes.cls.numpy(), boxes.conf.numpy())])
    return out


def runtime_predictions(model_dir: Path, paths: list[Path]) -> list[list[Detection]]:
    """detops' ModelRuntime on the model folder, one image per call as the service and evaluation
    meet a static-batch model, at the parity thresholds."""
    from pipelines.images import read_rgb
    from serving.runtime import ModelRuntime

    runtime = ModelRuntime.load(model_dir, threads=1)
    return [runtime.predict([read_rgb(p)], conf=CONF, iou=IOU, max_det=MAX_DET)[0] for p in paths]


def _matches(ours: list[Detection], theirs: list[Detection]) -> int:
    """Boxes of `theirs` with a partner of the same class in `ours` (each used once) at IoU >=
    MIN_BOX_IOU and |confidence difference| <= MAX_CONF_DIFF."""
    free = list(ours)
    matched = 0
    for t in theirs:
        for k, o in enumerate(free):
            if (o.class_id == t.class_id and abs(o.raw_confidence - t.raw_confidence) <= MAX_CONF_DIFF
                    and o.box.iou(t.box) >= MIN_BOX_IOU):
                matched += 1
                del free[k]
                break
    return matched


def parity(ours: list[list[Detection]], theirs: list[list[Detection]], gt: dict, *,
           agnostic: bool = False) -> Parity:
    """Per-image box matching and the pycocotools mAP@.5:.95 of both sets against `gt` (whose images
    are the predictions' images, in order); `agnostic`: every detection counts as category 0 (a model
    whose classes are not the ground truth's, such as the synthetic model on real photos)."""
    from evaluation.coco import coco_detections, coco_metrics

    assert len(ours) == len(theirs) == len(gt["images"])
    boxes = matched = 0
    unmatched = []
    for image, a, b in zip(gt["images"], ours, theirs):
        m = _matches(a, b)
        boxes += max(len(a), len(b))
        matched += m
        if m < max(len(a), len(b)):
            unmatched.append(image["file_name"])
    ids = [image["id"] for image in gt["images"]]
    if agnostic:
        ours, theirs = ([[replace(d, class_id=0) for d in image] for image in side]
                        for side in (ours, theirs))
    maps = [coco_metrics(gt, coco_detections(dict(zip(ids, side)), gt)).map50_95 for side in (ours, theirs)]
    return Parity(boxes, matched, unmatched, *maps)


def check_parity(result: Parity, what: str) -> None:
    """Issue 19's bar: >= 99 % of boxes matched, mAP within 0.005 (and enough boxes to mean something)."""
    assert result.boxes >= 100, f"{what}: only {result.boxes} boxes compared"
    assert result.share >= MIN_MATCHED, (f"{what}: {result.matched}/{result.boxes} boxes matched "
                                        f"({result.share:.4f}); e.g. on {result.unmatched_images[:3]}")
    assert abs(result.map_ours - result.map_theirs) <= MAX_MAP_DIFF, (
        f"{what}: mAP@.5:.95 {result.map_ours:.4f} (detops) vs {result.map_theirs:.4f} (ultralytics)")
