"""The model runtime shared by evaluation, the registry's pyfunc model, serving and benchmarks.

A model folder holds `model.onnx` (a YOLOv8/YOLO11 detection head: output (batch, 4 + classes,
anchors); fixed square input; dynamic batch, or a static one such as the batch of 1 that `yolo export`
writes by default, run in chunks of that size; float32 or float16 input), `model_card.json` (classes,
input size, preprocessing, default thresholds, provenance) and optionally `calibrator.json`.
`ModelRuntime` reproduces ultralytics' predictor on that ONNX model with numpy, OpenCV and ONNX
Runtime only (no torch, no ultralytics, so serving stays light):

- letterbox like `ultralytics.data.augment.LetterBox(auto=False, center=True)`: same gain, same
  rounding of the resized size and of the padding, pad value 114, `cv2.INTER_LINEAR`;
- NMS like `ultralytics.utils.nms.non_max_suppression`: candidates whose best class score is above
  the threshold, best class only, class-aware greedy NMS through per-class coordinate offsets,
  `max_det` kept;
- boxes back to the original image like `ultralytics.utils.ops.scale_boxes` (minus pad, divided by
  the per-axis gain, clipped).

`predict` is `resolve` (the request's thresholds, card defaults filled in and checked), `letterbox`
(uint8 images in the model's square), `to_input` (the float tensor), `infer` (ONNX Runtime) and
`postprocess` (NMS, boxes back to the image, calibration). Each step is public, so that the service
can decode and letterbox in its request threads, batch `infer` across requests and post-process per
request, running exactly the code that evaluation runs through `predict`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.errors import DetopsError
from pipelines.types import Box, Detection
from serving.calibrator import Calibrator

MODEL_FILE = "model.onnx"
CARD_FILE = "model_card.json"
CALIBRATOR_FILE = "calibrator.json"
WEIGHTS_FILE = "best.pt"

# Same constants as ultralytics.utils.nms.non_max_suppression.
MAX_WH = 7680  # per-class coordinate offset that keeps classes apart in one NMS pass
MAX_NMS = 30000  # most candidates NMS looks at, by score
# With a calibrator, `conf` applies to calibrated scores, so NMS must first see every box the raw
# model scores above this floor (a box below it cannot come back whatever the calibrator says).
RAW_CONF_FLOOR = 1e-3


class Preprocessing(BaseModel):
    """How an image becomes the model input (the card states it so other runtimes can follow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    letterbox: bool = True
    center: bool = True
    pad_value: int = 114
    channel_order: Literal["RGB"] = "RGB"
    scale: float = 1 / 255


class Thresholds(BaseModel):
    """Default post-processing thresholds; callers may override them per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.45, gt=0, le=1)
    max_det: int = Field(300, ge=1)


class ModelCard(BaseModel):
    """What a model folder's `model_card.json` says about the ONNX model next to it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    name: str
    classes: list[str]
    imgsz: int = Field(ge=32)
    stride: int = Field(32, ge=1)
    preprocessing: Preprocessing = Preprocessing()
    thresholds: Thresholds = Thresholds()
    run_id: str | None = None
    model_yaml: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    versions: dict[str, str] = {}
    source: dict[str, str] = {}  # where an imported model came from (training/importer.py); empty: trained here

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read and validate a card; a missing or invalid file is a DetopsError naming it."""
        path = Path(path)
        if not path.is_file():
            raise DetopsError(f"{path}: model card not found")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise DetopsError(f"{path}: invalid model card: {loc}: {first['msg']}") from None

    def save(self, path: Path) -> None:
        """Write the card as indented JSON."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    def resolve(self, conf: float | None = None, iou: float | None = None, max_det: int | None = None,
                classes: Sequence[int] | None = None) -> PredictParams:
        """The effective thresholds: each None replaced by the card's default, each value checked;
        InvalidParams names the first bad one. (The card alone decides: a caller can check a
        request's parameters without loading the model.)"""
        t = self.thresholds
        conf = t.conf if conf is None else conf
        iou = t.iou if iou is None else iou
        max_det = t.max_det if max_det is None else max_det
        if not 0 <= conf <= 1:
            raise InvalidParams("conf", f"must be in [0, 1] (got {conf})")
        if not 0 < iou <= 1:
            raise InvalidParams("iou", f"must be in (0, 1] (got {iou})")
        if max_det < 1:
            raise InvalidParams("max_det", f"must be >= 1 (got {max_det})")
        if classes is not None:
            names = self.classes
            bad = sorted({c for c in classes if not 0 <= c < len(names)})
            if bad:
                raise InvalidParams("classes", f"unknown class ids {bad} (the model has {len(names)}: "
                                    f"{', '.join(names)})")
            classes = tuple(sorted(set(classes)))
        return PredictParams(float(conf), float(iou), int(max_det), classes)


class InvalidParams(DetopsError):
    """A detection parameter out of range, or a class id the model does not have; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class PredictParams:
    """The thresholds one prediction runs with (the card's defaults filled in), as `resolve` returns
    them; `classes` is sorted and deduplicated, None for all."""

    conf: float
    iou: float
    max_det: int
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class LetterboxMeta:
    """Where one original image sits in the model input: per-axis gain and left/top padding."""

    orig_h: int
    orig_w: int
    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int


def letterbox_params(orig_h: int, orig_w: int, size: int) -> tuple[tuple[int, int], LetterboxMeta]:
    """The resized (w, h) and the placement of an image in a `size`x`size` input, rounded exactly as
    ultralytics' LetterBox (auto=False, center=True) and scale_boxes do."""
    r = min(size / orig_h, size / orig_w)
    new_w, new_h = max(round(orig_w * r), 1), max(round(orig_h * r), 1)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    meta = LetterboxMeta(orig_h, orig_w, new_w / orig_w, new_h / orig_h, round(dw - 0.1), round(dh - 0.1))
    return (new_w, new_h), meta


def letterbox(image: np.ndarray, size: int, pad_value: int = 114) -> tuple[np.ndarray, LetterboxMeta]:
    """Resize `image` (HxWx3) keeping its aspect ratio and pad it to `size`x`size`."""
    import cv2

    (new_w, new_h), meta = letterbox_params(image.shape[0], image.shape[1], size)
    if (image.shape[1], image.shape[0]) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((size, size, 3), pad_value, dtype=np.uint8)
    out[meta.pad_y:meta.pad_y + new_h, meta.pad_x:meta.pad_x + new_w] = image
    return out, meta


def scale_boxes(boxes: np.ndarray, meta: LetterboxMeta) -> np.ndarray:
    """Boxes (N, 4 xyxy) from model-input pixels to original-image pixels, clipped to the image."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = ((out[:, [0, 2]] - meta.pad_x) / meta.gain_x).clip(0, meta.orig_w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - meta.pad_y) / meta.gain_y).clip(0, meta.orig_h)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, limit: int | None = None) -> np.ndarray:
    """Greedy NMS as torchvision.ops.nms computes it (float32, IoU > threshold suppresses, a NaN IoU
    of degenerate boxes does not): indices of the kept boxes by decreasing score, at most `limit`."""
    boxes = boxes.astype(np.float32, copy=False)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        while order.size and (limit is None or len(keep) < limit):
            i, rest = order[0], order[1:]
            keep.append(int(i))
            w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), np.float32(0))
            h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), np.float32(0))
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            order = rest[~(iou > np.float32(iou_thres))]
    return np.asarray(keep, dtype=np.int64)


def decode(pred: np.ndarray, conf_thres: float, iou_thres: float, *, classes: Sequence[int] | None = None,
           limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw output (4 + nc, anchors: cx, cy, w, h, class scores) to NMS-kept
    (boxes xyxy, scores, class ids), best class per box, in model-input pixels."""
    x = pred.T
    cls_scores = x[:, 4:]
    best = cls_scores.max(axis=1)
    x = x[best > conf_thres]
    if not x.shape[0]:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    half = x[:, 2:4] / 2
    boxes = np.concatenate([x[:, :2] - half, x[:, :2] + half], axis=1)
    cls_id = x[:, 4:].argmax(axis=1)
    scores = x[np.arange(x.shape[0]), 4 + cls_id]
    keep = scores > conf_thres
    if classes is not None:
        keep &= np.isin(cls_id, np.asarray(classes))
    boxes, scores, cls_id = boxes[keep], scores[keep], cls_id[keep]
    if boxes.shape[0] > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        boxes, scores, cls_id = boxes[top], scores[top], cls_id[top]
    offset = (cls_id.astype(np.float32) * np.float32(MAX_WH))[:, None]
    kept = nms(boxes + offset, scores, iou_thres, limit)
    return boxes[kept], scores[kept], cls_id[kept]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


SUPPORTED = ("supported: an ultralytics YOLOv8/YOLO11-style detection head exported to ONNX with raw "
             "outputs (batch, 4 + classes, anchors) and a square input, e.g. `yolo export format=onnx "
             "imgsz=640`; end-to-end (NMS-free) exports such as YOLO26's default, and segmentation, pose, "
             "OBB or classification heads are not")


def check_graph(session: Any, n_classes: int, imgsz: int, where: Path | str) -> None:
    """Refuse an ONNX graph the runtime cannot run or decode, naming what is supported: one float
    (N, 3, S, S) input with S = `imgsz` (or symbolic), one output (N, 4 + `n_classes`, anchors)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].type not in ("tensor(float)", "tensor(float16)"):
        raise DetopsError(f"{where}: expects one float image input, has "
                          f"{[(i.name, i.type) for i in inputs]}; {SUPPORTED}")
    shape = inputs[0].shape
    if len(shape) != 4 or shape[1] != 3:
        raise DetopsError(f"{where}: input shape {shape} is not (batch, 3, height, width); {SUPPORTED}")
    sizes = [d for d in shape[2:] if isinstance(d, int)]
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise DetopsError(f"{where}: input {shape[2]}x{shape[3]} is not square; {SUPPORTED} "
                          f"(export again with one imgsz)")
    if any(d != imgsz for d in sizes):
        raise DetopsError(f"{where}: input shape {shape} does not match the card's imgsz {imgsz}")
    out = outputs[0].shape
    if len(outputs) != 1 or len(out) != 3 or out[1] != 4 + n_classes:
        raise DetopsError(f"{where}: output {[o.shape for o in outputs]} is not the detection head "
                          f"(batch, 4 + {n_classes} classes, anchors) detops decodes; {SUPPORTED}")


class ModelRuntime:
    """An ONNX detector with its card and calibrator. Safe to share between threads: the session is
    created once and `InferenceSession.run` is thread-safe; every call allocates its own buffers."""

    def __init__(self, session: Any, card: ModelCard, calibrator: Calibrator, model_dir: Path) -> None:
        self.session = session
        self.card = card
        self.calibrator = calibrator
        self.model_dir = model_dir
        model_input = session.get_inputs()[0]
        self.input_name: str = model_input.name
        # A fixed batch (ultralytics exports batch 1 unless dynamic=True): `infer` runs chunks of it.
        self.static_batch: int | None = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32

    @property
    def class_names(self) -> list[str]:
        return self.card.classes

    @classmethod
    def load(cls, model_dir: Path, *, threads: int | None = None, calibrated: bool = True) -> ModelRuntime:
        """Open `model_dir/model.onnx` with its card, and its calibrator when `calibrated` and present."""
        import onnxruntime as ort

        model_dir = Path(model_dir)
        onnx_path = model_dir / MODEL_FILE
        if not onnx_path.is_file():
            raise DetopsError(f"{model_dir}: no {MODEL_FILE} (train a model first: detops train)")
        card = ModelCard.load(model_dir / CARD_FILE)
        calibrator = Calibrator.load(model_dir / CALIBRATOR_FILE) if calibrated else Calibrator()
        if threads is not None and threads < 1:
            raise DetopsError(f"threads must be >= 1 (got {threads})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise DetopsError(f"{onnx_path}: cannot load ONNX model ({type(exc).__name__}: {exc})") from None
        check_graph(session, len(card.classes), card.imgsz, onnx_path)
        return cls(session, card, calibrator, model_dir)

    # ------------------------------------------------------------------ steps
    def resolve(self, conf: float | None = None, iou: float | None = None, max_det: int | None = None,
                classes: Sequence[int] | None = None) -> PredictParams:
        """The effective thresholds (`ModelCard.resolve`)."""
        return self.card.resolve(conf, iou, max_det, classes)

    def letterbox(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxMeta]]:
        """RGB uint8 HxWx3 images of any sizes -> their letterboxed (N, imgsz, imgsz, 3) uint8 stack,
        and where each image sits in it."""
        size, pad = self.card.imgsz, self.card.preprocessing.pad_value
        boxed = np.empty((len(images), size, size, 3), dtype=np.uint8)
        metas = []
        for i, image in enumerate(images):
            _check_image(image, i)
            boxed[i], meta = letterbox(image, size, pad)
            metas.append(meta)
        return boxed, metas

    def to_input(self, boxed: np.ndarray) -> np.ndarray:
        """A letterboxed uint8 (N, S, S, 3) stack -> the model input: (N, 3, S, S) float32, scaled."""
        tensor = np.ascontiguousarray(boxed.transpose(0, 3, 1, 2), dtype=np.float32)
        tensor *= np.float32(self.card.preprocessing.scale)
        return tensor

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The raw model output for a model input: (N, 4 + nc, anchors), float32. A static-batch model
        runs the input in chunks of its batch size, the last one padded with zeros."""
        batch = batch.astype(self.input_dtype, copy=False)
        size = self.static_batch
        if size is None or len(batch) == size:
            return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)
        parts = []
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size]
            n = len(chunk)
            if n < size:
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
            parts.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(parts).astype(np.float32, copy=False)

    def postprocess(self, raw: np.ndarray, metas: Sequence[LetterboxMeta],
                    params: PredictParams) -> list[list[Detection]]:
        """NMS on raw scores, boxes back to original pixels, calibration, then the `conf` filter on
        the calibrated confidence and `max_det`."""
        conf, iou, max_det, classes = params.conf, params.iou, params.max_det, params.classes
        identity = self.calibrator.method == "identity"
        # With identity calibration this is exactly ultralytics' predictor (conf before NMS, which
        # cannot change the kept set above conf since greedy NMS only suppresses lower scores).
        floor = conf if identity else min(conf, RAW_CONF_FLOOR)
        results = []
        for pred, meta in zip(raw, metas):
            boxes, raw_scores, cls_id = decode(pred, floor, iou, classes=classes,
                                               limit=max_det if identity else None)
            boxes = scale_boxes(boxes, meta)
            scores = self.calibrator.apply(raw_scores, boxes, meta.orig_w, meta.orig_h)
            keep = np.flatnonzero(scores > conf)
            if not identity:  # calibration may reorder: best calibrated first
                keep = keep[np.argsort(-scores[keep], kind="stable")]
            keep = keep[:max_det]
            results.append([
                Detection(Box(*(float(v) for v in boxes[k])), int(cls_id[k]), float(scores[k]),
                          float(raw_scores[k]))
                for k in keep
            ])
        return results

    def predict(self, images: Sequence[np.ndarray], *, conf: float | None = None, iou: float | None = None,
                max_det: int | None = None, classes: Sequence[int] | None = None) -> list[list[Detection]]:
        """Detections per image (boxes in original pixels); thresholds default to the card's."""
        params = self.resolve(conf, iou, max_det, classes)  # fail before spending inference time
        if not len(images):
            return []
        boxed, metas = self.letterbox(images)
        return self.postprocess(self.infer(self.to_input(boxed)), metas, params)


def _check_image(image: Any, index: int) -> None:
    if not isinstance(image, np.ndarray):
        raise DetopsError(f"image {index}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DetopsError(f"image {index}: expected an RGB uint8 HxWx3 array, got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise DetopsError(f"image {index}: empty image {image.shape}")
