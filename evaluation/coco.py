"""COCO-style detection metrics with pycocotools, and a paired bootstrap of the mAP difference.

The ground truth of a split is a COCO json built from the YOLO labels (category id = class id, image
and annotation ids from 1: pycocotools treats a matched ground-truth id of 0 as "unmatched").
Detections are scored with their *raw* model confidence, as mAP ranks by the model's own score.

Bootstrap: `COCOeval.evaluate()` (the IoU matching, the expensive part) runs once per detection set;
`PerImageEval` keeps its per-image, per-category matches. mAP on a resample of images (with
repetition) is then re-accumulated in numpy by weighting every image by how many times it was drawn,
which reproduces `COCOeval.accumulate()` exactly on the full set (tested) and costs milliseconds per
resample instead of a full re-evaluation.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.errors import DetopsError
from pipelines.types import Detection, YoloDataset

SIZE_BUCKETS = ("small", "medium", "large")  # COCO area ranges: < 32², 32²..96², > 96² pixels


def coco_ground_truth(dataset: YoloDataset, split: str) -> dict:
    """COCO ground-truth json of one split: images (id from 1, file name, width, height), one
    annotation per YOLO label (bbox xywh in pixels, area, iscrowd 0), categories in class-id order."""
    from pipelines.images import oriented_size

    paths = dataset.images(split)
    if not paths:
        raise DetopsError(f"{dataset.image_dir(split)}: no images in split {split!r}")
    images, annotations = [], []
    for image_id, path in enumerate(paths, start=1):
        width, height = oriented_size(path)  # labels refer to the image as displayed (EXIF)
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for label in dataset.labels(path):
            if not 0 <= label.class_id < len(dataset.class_names):
                raise DetopsError(f"{dataset.label_path(path)}: class id {label.class_id} is not in "
                                  f"0..{len(dataset.class_names) - 1}")
            box = label.box(width, height)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": label.class_id, "bbox": box.to_xywh(),
                                "area": box.area, "iscrowd": 0})
    categories = [{"id": i, "name": name} for i, name in enumerate(dataset.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def image_ids(gt: dict) -> dict[str, int]:
    """File name -> image id of a COCO ground truth."""
    return {image["file_name"]: image["id"] for image in gt["images"]}


def coco_detections(predictions: dict[int, list[Detection]], gt: dict) -> list[dict]:
    """COCO results list (image_id, category_id, bbox xywh, score = raw confidence) of the
    predictions keyed by image id; ids and classes are checked against `gt`."""
    known_images = {image["id"] for image in gt["images"]}
    known_classes = {cat["id"] for cat in gt["categories"]}
    results = []
    for image_id, detections in predictions.items():
        if image_id not in known_images:
            raise DetopsError(f"predictions for image id {image_id}, which is not in the ground truth")
        for det in detections:
            if det.class_id not in known_classes:
                raise DetopsError(f"a detection of class id {det.class_id} on image {image_id}: the "
                                  f"ground truth has classes {sorted(known_classes)}")
            results.append({"image_id": int(image_id), "category_id": int(det.class_id),
                            "bbox": [float(v) for v in det.box.to_xywh()],
                            "score": float(det.raw_confidence)})
    return results


def background_detections(predictions: dict[int, list[Detection]], gt: dict, conf: float) -> dict[str, int]:
    """False positives on the background images of `gt` (images without any ground-truth box): how
    many such images, how many detections with confidence above `conf` they got, and on how many of
    them. COCO mAP barely sees these (an image without ground truth only adds unmatched detections to
    each class's ranking), so they are counted apart."""
    with_boxes = {ann["image_id"] for ann in gt.get("annotations", [])}
    background = [image["id"] for image in gt["images"] if image["id"] not in with_boxes]
    counts = [sum(d.confidence > conf for d in predictions.get(i, [])) for i in background]
    return {"images": len(background), "detections": int(sum(counts)),
            "images_with_detections": sum(n > 0 for n in counts)}


@dataclass
class CocoMetrics:
    """COCO summary metrics. AP/AR of a category or size bucket with no ground truth is None.

    `precision` is COCOeval's precision at area "all", 100 detections per image: shape
    (len(iou_thresholds), len(recall_thresholds), n_classes), -1 where a class has no ground truth.
    """

    map50_95: float
    map50: float
    map75: float
    ar1: float
    ar10: float
    ar100: float
    per_class: dict[str, dict[str, Any]]
    size: dict[str, dict[str, float | None]]
    precision: np.ndarray = field(repr=False)
    iou_thresholds: np.ndarray = field(repr=False)
    recall_thresholds: np.ndarray = field(repr=False)
    class_names: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON-serializable part (no arrays)."""
        return {"map50_95": self.map50_95, "map50": self.map50, "map75": self.map75,
                "ar1": self.ar1, "ar10": self.ar10, "ar100": self.ar100,
                "per_class": self.per_class, "size": self.size}


def _quiet(fn: Any, *args: Any) -> Any:
    # pycocotools prints progress to stdout on every call.
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _run_cocoeval(gt: dict, dt: list[dict]) -> Any | None:
    """A COCOeval with evaluate() and accumulate() done; None when there are no detections
    (loadRes refuses an empty list)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = {**gt, "annotations": list(gt.get("annotations", []))}
    _quiet(coco_gt.createIndex)
    if not dt:
        return None
    try:
        coco_dt = _quiet(coco_gt.loadRes, [dict(d) for d in dt])  # loadRes adds keys: copy
    except AssertionError:
        raise DetopsError("detections refer to image ids that are not in the ground truth") from None
    cocoeval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    _quiet(cocoeval.evaluate)
    _quiet(cocoeval.accumulate)
    return cocoeval


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def coco_metrics(gt: dict, dt: list[dict]) -> CocoMetrics:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75, AR@1/10/100, per-class AP, small/medium/large AP and AR,
    all from pycocotools' COCOeval. No detections at all gives 0 everywhere a ground truth exists."""
    from pycocotools.cocoeval import Params

    if not gt.get("categories"):
        raise DetopsError("the ground truth has no categories")
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [cat["name"] for cat in cats]
    cat_index = {cat["id"]: k for k, cat in enumerate(cats)}
    params = Params(iouType="bbox")
    # Ground-truth counts per (class, area range), area ranges as COCOeval: all, small, medium, large.
    gt_counts = np.zeros((len(names), len(params.areaRng)), dtype=int)
    for ann in gt.get("annotations", []):
        for a, (lo, hi) in enumerate(params.areaRng):
            gt_counts[cat_index[ann["category_id"]], a] += int(lo <= ann["area"] <= hi)
    cocoeval = _run_cocoeval(gt, dt)
    if cocoeval is None:
        # What COCOeval reports for no detections: 0 where ground truth exists, -1 where none does.
        has_gt = np.where(gt_counts > 0, 0.0, -1.0)  # (K, A)
        precision = np.broadcast_to(has_gt[None, None, :, :, None],
                                    (len(params.iouThrs), len(params.recThrs), *has_gt.shape, 3))
        recall = np.broadcast_to(has_gt[None, :, :, None], (len(params.iouThrs), *has_gt.shape, 3))
        iou_thrs, rec_thrs = params.iouThrs, params.recThrs
    else:
        precision, recall = cocoeval.eval["precision"], cocoeval.eval["recall"]
        iou_thrs, rec_thrs = cocoeval.params.iouThrs, cocoeval.params.recThrs
    # Index order of COCOeval: area ranges (all, small, medium, large), maxDets (1, 10, 100).
    i50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    i75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    p_all = precision[:, :, :, 0, 2]
    per_class = {}
    for k, name in enumerate(names):
        per_class[name] = {"ap50_95": _mean_valid(p_all[:, :, k]), "ap50": _mean_valid(p_all[i50, :, k]),
                           "n_gt": int(gt_counts[k, 0])}
    size = {bucket: {"ap": _mean_valid(precision[:, :, :, a, 2]), "ar": _mean_valid(recall[:, :, a, 2])}
            for a, bucket in enumerate(SIZE_BUCKETS, start=1)}
    return CocoMetrics(
        map50_95=_mean_valid(p_all) or 0.0,
        map50=_mean_valid(p_all[i50]) or 0.0,
        map75=_mean_valid(p_all[i75]) or 0.0,
        ar1=_mean_valid(recall[:, :, 0, 0]) or 0.0,
        ar10=_mean_valid(recall[:, :, 0, 1]) or 0.0,
        ar100=_mean_valid(recall[:, :, 0, 2]) or 0.0,
        per_class=per_class, size=size, precision=p_all,
        iou_thresholds=np.asarray(iou_thrs), recall_thresholds=np.asarray(rec_thrs), class_names=names,
    )


@dataclass
class _CategoryMatches:
    img: np.ndarray  # (D,) image index of each detection, detections sorted by descending score
    tp: np.ndarray  # (T, D) matched and not ignored
    fp: np.ndarray  # (T, D) unmatched and not ignored
    npig: np.ndarray  # (I,) not-ignored ground truths per image


class PerImageEval:
    """COCOeval's per-image matches (area "all", 100 detections per image) of one detection set, from
    which `map50_95(weights)` re-accumulates mAP@[.5:.95] for any per-image weights (bootstrap)."""

    def __init__(self, gt: dict, dt: list[dict]) -> None:
        from pycocotools.cocoeval import Params

        params = Params(iouType="bbox")
        self.image_ids = sorted(image["id"] for image in gt["images"])
        self.recall_thresholds = params.recThrs
        n_images = len(self.image_ids)
        cat_ids = sorted(cat["id"] for cat in gt["categories"])
        self._cats: list[_CategoryMatches] = []
        cocoeval = _run_cocoeval(gt, dt)
        index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        for k, cat_id in enumerate(cat_ids):
            npig = np.zeros(n_images)
            for ann in gt.get("annotations", []):
                if ann["category_id"] == cat_id and not ann.get("iscrowd", 0):
                    npig[index[ann["image_id"]]] += 1
            if cocoeval is None:
                empty = np.zeros((len(params.iouThrs), 0), dtype=bool)
                self._cats.append(_CategoryMatches(np.zeros(0, dtype=int), empty, empty, npig))
                continue
            max_det = cocoeval.params.maxDets[-1]
            # evalImgs is laid out [category][area range][image]; area "all" is index 0.
            start = k * len(cocoeval.params.areaRng) * n_images
            scores, imgs, matches, ignores = [], [], [], []
            for i, e in enumerate(cocoeval.evalImgs[start:start + n_images]):
                if e is None:
                    continue
                n = len(e["dtScores"][:max_det])
                scores.append(np.asarray(e["dtScores"][:max_det]))
                imgs.append(np.full(n, i))
                matches.append(e["dtMatches"][:, :max_det])
                ignores.append(e["dtIgnore"][:, :max_det])
            if not scores:
                empty = np.zeros((len(params.iouThrs), 0), dtype=bool)
                self._cats.append(_CategoryMatches(np.zeros(0, dtype=int), empty, empty, npig))
                continue
            order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as COCOeval sorts
            dtm = np.concatenate(matches, axis=1)[:, order] > 0
            dtig = np.concatenate(ignores, axis=1)[:, order].astype(bool)
            self._cats.append(_CategoryMatches(np.concatenate(imgs)[order], dtm & ~dtig, ~dtm & ~dtig, npig))

    def map50_95(self, weights: np.ndarray | None = None) -> float:
        """mAP@[.5:.95] with image i counted `weights[i]` times (None: each once, as COCOeval)."""
        w = np.ones(len(self.image_ids)) if weights is None else np.asarray(weights, dtype=float)
        aps = []
        for cat in self._cats:
            npig = float(w @ cat.npig)
            if npig == 0:
                continue  # absent from this sample: excluded from the mean, as COCOeval does
            n_det = cat.img.size
            if n_det == 0:
                aps.append(0.0)
                continue
            dw = w[cat.img]
            tp = np.cumsum(cat.tp * dw, axis=1)
            fp = np.cumsum(cat.fp * dw, axis=1)
            recall = tp / npig
            precision = tp / (tp + fp + np.spacing(1))
            # Precision envelope: the best precision at this recall or higher.
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            q = np.zeros((tp.shape[0], self.recall_thresholds.size))
            for t in range(tp.shape[0]):
                idx = np.searchsorted(recall[t], self.recall_thresholds, side="left")
                ok = idx < n_det
                q[t, ok] = envelope[t, idx[ok]]
            aps.append(float(q.mean()))
        return float(np.mean(aps)) if aps else 0.0


def bootstrap_map_delta(gt: dict, dt_a: list[dict], dt_b: list[dict], n: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> tuple[float, float, float]:
    """Paired bootstrap over images of mAP@[.5:.95](b) - mAP@[.5:.95](a): (delta on the full set,
    lower, upper percentile bound of the `confidence` interval). Both sets see the same resamples."""
    if n < 1:
        raise DetopsError(f"bootstrap needs at least 1 resample (got n={n})")
    if not 0 < confidence < 1:
        raise DetopsError(f"bootstrap confidence must be in (0, 1) (got {confidence})")
    eval_a, eval_b = PerImageEval(gt, dt_a), PerImageEval(gt, dt_b)
    n_images = len(eval_a.image_ids)
    rng = np.random.default_rng(seed)
    deltas = np.empty(n)
    for s in range(n):
        weights = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        deltas[s] = eval_b.map50_95(weights) - eval_a.map50_95(weights)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return eval_b.map50_95() - eval_a.map50_95(), float(lo), float(hi)
