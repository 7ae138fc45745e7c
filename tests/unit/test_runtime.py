"""serving.runtime without a trained model: letterbox geometry against ultralytics' LetterBox, NMS on
hand-made boxes, and the raw/calibrated confidence plumbing through a real (hand-built) ONNX graph
whose output is a known prediction tensor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import DetopsError
from serving.calibrator import Calibrator
from serving.runtime import (
    CALIBRATOR_FILE,
    CARD_FILE,
    MODEL_FILE,
    InvalidParams,
    LetterboxMeta,
    ModelCard,
    ModelRuntime,
    PredictParams,
    decode,
    letterbox,
    letterbox_params,
    nms,
    scale_boxes,
)

SHAPES = [(100, 100), (480, 640), (640, 480), (37, 301), (333, 71), (1, 500), (64, 64), (20, 30)]


@pytest.mark.parametrize("size", [64, 160])
@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_matches_ultralytics_pixel_for_pixel(shape: tuple[int, int], size: int) -> None:
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(sum(shape) + size)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, _ = letterbox(image, size)
    theirs = LetterBox((size, size), auto=False, center=True, stride=32)(image=image)
    assert ours.shape == theirs.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_scale_boxes_matches_ultralytics(shape: tuple[int, int]) -> None:
    import torch
    from ultralytics.utils.ops import scale_boxes as ul_scale_boxes

    _, meta = letterbox_params(*shape, 160)
    boxes = np.array([[0, 0, 160, 160], [10.5, 20.25, 90, 150], [-5, 30, 170, 40]], dtype=np.float32)
    expected = ul_scale_boxes((160, 160), torch.from_numpy(boxes.copy()), shape).numpy()
    np.testing.assert_allclose(scale_boxes(boxes, meta), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(480, 640), (333, 71), (200, 200)])
def test_letterbox_round_trip_of_a_drawn_box(shape: tuple[int, int]) -> None:
    """A filled rectangle drawn in the original lands where the geometry says, and maps back."""
    h, w = shape
    image = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = int(w * 0.2), int(h * 0.3), int(w * 0.7), int(h * 0.9)
    image[y1:y2, x1:x2] = 255
    boxed, meta = letterbox(image, 160)
    ys, xs = np.nonzero(boxed[..., 0] > 127)  # the rectangle's pixels after resizing (pad is 114)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)
    forward = np.array([[x1 * meta.gain_x + meta.pad_x, y1 * meta.gain_y + meta.pad_y,
                         x2 * meta.gain_x + meta.pad_x, y2 * meta.gain_y + meta.pad_y]])
    np.testing.assert_allclose(found, forward, atol=1.0)  # interpolation blurs edges by < 1 px
    back = scale_boxes(forward.astype(np.float32), meta)
    np.testing.assert_allclose(back, [[x1, y1, x2, y2]], atol=1e-3)


def test_nms_known_answers() -> None:
    boxes = np.array([
        [0, 0, 10, 10],     # 0: best
        [1, 1, 11, 11],     # 1: IoU 0.68 with 0 -> suppressed at 0.5
        [20, 20, 30, 30],   # 2: disjoint -> kept
        [0, 0, 10, 5],      # 3: IoU 0.5 with 0: not > 0.5 -> kept
    ], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, 0.4).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5, limit=2).tolist() == [0, 2]
    # Order follows the scores: 3 first; 1 (IoU 0.32 with 3) is kept and then suppresses 0.
    assert nms(boxes, scores[::-1].copy(), 0.5).tolist() == [3, 2, 1]


def test_nms_matches_torchvision_on_random_boxes() -> None:
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 40, (500, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 500).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, iou), expected)


def _raw(rows: list[tuple[float, float, float, float, list[float]]]) -> np.ndarray:
    """(4 + nc, anchors) model output from rows of (cx, cy, w, h, class scores)."""
    return np.array([[*box, *cls] for *box, cls in rows], dtype=np.float32).T


def test_decode_is_class_aware_and_respects_thresholds() -> None:
    pred = _raw([
        (50, 50, 20, 20, [0.9, 0.1]),   # class 0
        (51, 51, 20, 20, [0.8, 0.1]),   # class 0, overlaps the first -> suppressed
        (51, 51, 20, 20, [0.1, 0.7]),   # class 1, same place -> kept (other class)
        (100, 100, 10, 10, [0.3, 0.2]),  # exactly at conf 0.3 -> dropped (strictly greater)
        (120, 120, 10, 10, [0.31, 0.2]),
    ])
    boxes, scores, cls = decode(pred, 0.3, 0.45)
    assert cls.tolist() == [0, 1, 0]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.31])
    np.testing.assert_allclose(boxes[0], [40, 40, 60, 60])
    _, _, only1 = decode(pred, 0.3, 0.45, classes=[1])
    assert only1.tolist() == [1]
    assert len(decode(pred, 0.3, 0.45, limit=1)[0]) == 1
    assert len(decode(pred, 0.95, 0.45)[0]) == 0


# ---------------------------------------------------------------------------- a real ONNX graph
IMGSZ = 64
KNOWN = _raw([
    (32, 32, 16, 16, [0.6, 0.05]),   # raw 0.6
    (10, 40, 8, 8, [0.05, 0.3]),     # raw 0.3
    (33, 32, 16, 16, [0.55, 0.05]),  # overlaps the first, same class -> suppressed by NMS
])


def _write_model_dir(folder: Path, calibrator: Calibrator | None = None, *, batch: int | str = "batch",
                     hw: tuple[int, int] = (IMGSZ, IMGSZ), known: np.ndarray = KNOWN) -> Path:
    """A model folder whose ONNX graph returns `known` for every image (output = known + 0 * sum(input)),
    with a dynamic or a static `batch` and an input of `hw` pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("ReduceSum", ["images", "axes"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Reshape", ["nothing", "shape"], ["column"]),
        helper.make_node("Add", ["column", "known"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(known[None], "known"),
    ]
    graph = helper.make_graph(
        nodes, "known", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, *hw])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, *known.shape])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, folder / MODEL_FILE)
    ModelCard(name="known", classes=["a", "b"], imgsz=IMGSZ, model_yaml="none").save(folder / CARD_FILE)
    if calibrator is not None:
        calibrator.save(folder / CALIBRATOR_FILE)
    return folder


def test_predict_maps_boxes_to_original_pixels(tmp_path: Path) -> None:
    runtime = ModelRuntime.load(_write_model_dir(tmp_path / "m"), threads=1)
    assert runtime.calibrator.method == "identity"
    images = [np.zeros((128, 128, 3), np.uint8), np.zeros((64, 128, 3), np.uint8)]
    square, wide = runtime.predict(images, conf=0.1, iou=0.45)
    assert [d.class_id for d in square] == [0, 1]
    assert square[0].box.x1 == pytest.approx(48) and square[0].box.x2 == pytest.approx(80)  # gain 0.5
    # 128x64 -> 64x32 placed 16 px down: y = (32 - 16) / 0.5 = 32 for the centre.
    assert (wide[0].box.y1 + wide[0].box.y2) / 2 == pytest.approx(32)
    for det in square + wide:
        assert det.confidence == det.raw_confidence
    assert [d.raw_confidence for d in square] == pytest.approx([0.6, 0.3])


def test_platt_calibration_plumbing(tmp_path: Path) -> None:
    # logit(calibrated) = logit(raw) + 2: confidences go up; NMS still ran on raw scores.
    platt_up = Calibrator(method="platt", coef=[1.0, 0.0, 0.0, 0.0, 0.0], intercept=2.0)
    runtime = ModelRuntime.load(_write_model_dir(tmp_path / "up", platt_up), threads=1)
    image = [np.zeros((64, 64, 3), np.uint8)]
    dets = runtime.predict(image, conf=0.5)[0]
    expected = platt_up.apply(np.array([0.6, 0.3]), np.array([[24, 24, 40, 40], [6, 36, 14, 44]]), 64, 64)
    # The raw-0.3 box is kept: `conf` filters the calibrated confidence (0.76 > 0.5), not the raw one.
    assert [d.raw_confidence for d in dets] == pytest.approx([0.6, 0.3])
    assert [d.confidence for d in dets] == pytest.approx(expected.tolist(), abs=1e-6)
    assert len(dets) == 2  # the overlapping raw-0.55 box stays suppressed whatever its calibration
    # calibrated=False ignores the calibrator file.
    plain = ModelRuntime.load(tmp_path / "up", threads=1, calibrated=False).predict(image, conf=0.5)[0]
    assert [d.confidence for d in plain] == pytest.approx([0.6])

    platt_down = Calibrator(method="platt", coef=[1.0, 0.0, 0.0, 0.0, 0.0], intercept=-2.0)
    runtime = ModelRuntime.load(_write_model_dir(tmp_path / "down", platt_down), threads=1)
    assert runtime.predict(image, conf=0.5)[0] == []  # raw 0.6 -> calibrated 0.17
    assert len(runtime.predict(image, conf=0.01)[0]) == 2


def test_preprocess_layout_and_scale(tmp_path: Path) -> None:
    runtime = ModelRuntime.load(_write_model_dir(tmp_path / "m"), threads=1)
    image = np.zeros((32, 64, 3), np.uint8)
    image[..., 0] = 255  # red in RGB
    boxed, metas = runtime.letterbox([image])
    assert boxed.shape == (1, 64, 64, 3) and boxed.dtype == np.uint8
    batch = runtime.to_input(boxed)
    assert batch.shape == (1, 3, 64, 64) and batch.dtype == np.float32
    assert batch[0, 0, 32, 32] == pytest.approx(1.0) and batch[0, 2, 32, 32] == 0.0  # channel 0 is R
    assert batch[0, 0, 0, 0] == pytest.approx(114 / 255)  # padding row
    assert metas == [LetterboxMeta(32, 64, 1.0, 1.0, 0, 16)]


def test_resolve_fills_card_defaults_and_normalizes_classes(tmp_path: Path) -> None:
    runtime = ModelRuntime.load(_write_model_dir(tmp_path / "m"), threads=1)
    t = runtime.card.thresholds
    assert runtime.resolve() == PredictParams(t.conf, t.iou, t.max_det, None)
    # Spelling out a default, or classes in any order with repeats, resolves to the same parameters.
    assert runtime.resolve(conf=t.conf, classes=[1, 0, 1]) == runtime.resolve(classes=[0, 1])
    assert runtime.resolve(classes=[1, 0]).classes == (0, 1)
    with pytest.raises(InvalidParams, match="classes: unknown class ids \\[2, 7\\]") as info:
        runtime.resolve(classes=[7, 0, 2])
    assert info.value.field == "classes"
    with pytest.raises(InvalidParams, match="iou: must be in") as info:
        runtime.resolve(iou=0)
    assert info.value.field == "iou"


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DetopsError, match="no model.onnx"):
        ModelRuntime.load(tmp_path / "nothing")
    folder = _write_model_dir(tmp_path / "m")
    runtime = ModelRuntime.load(folder, threads=1)
    with pytest.raises(DetopsError, match="image 1: expected an RGB uint8"):
        runtime.predict([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(DetopsError, match="image 0: expected an RGB uint8"):
        runtime.predict([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(DetopsError, match="conf: must be"):
        runtime.predict([np.zeros((8, 8, 3), np.uint8)], conf=1.5)
    with pytest.raises(DetopsError, match="unknown class ids \\[5\\]"):
        runtime.predict([np.zeros((8, 8, 3), np.uint8)], classes=[5])
    (folder / CARD_FILE).write_text('{"name": "x"}')
    with pytest.raises(DetopsError, match="invalid model card"):
        ModelRuntime.load(folder)
    ModelCard(name="x", classes=["a"], imgsz=96, model_yaml="y").save(folder / CARD_FILE)
    with pytest.raises(DetopsError, match="does not match the card's imgsz 96"):
        ModelRuntime.load(folder)


def test_runtime_imports_neither_torch_nor_ultralytics() -> None:
    code = "import sys, serving.runtime; bad = {'torch', 'ultralytics'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not a calibrator file"),
    ('{"method": "platt", "coef": [1, 2]}', "platt needs 5 coefficients, got 2"),
    ('{"method": "isotonic", "x_thresholds": [0, 1], "y_thresholds": [0]}', "isotonic needs matching"),
    ('{"method": "magic"}', "unknown calibration method 'magic'"),
    ('{"method": "platt", "slope": 2}', "not a calibrator file"),
])
def test_a_bad_calibrator_file_is_refused_when_loaded(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "calibrator.json").write_text(content)
    with pytest.raises(DetopsError, match=message):
        Calibrator.load(tmp_path / "calibrator.json")


@pytest.mark.parametrize("batch", [1, 2])
def test_a_static_batch_model_runs_any_number_of_images(tmp_path: Path, batch: int) -> None:
    """ultralytics' default export has a batch of 1: ONNX Runtime refuses any other ("Got: 3 Expected:
    1"); the runtime runs chunks of the model's batch (the last padded) and keeps the order."""
    static = ModelRuntime.load(_write_model_dir(tmp_path / "static", batch=batch), threads=1)
    dynamic = ModelRuntime.load(_write_model_dir(tmp_path / "dynamic"), threads=1)
    assert static.static_batch == batch and dynamic.static_batch is None
    images = [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8), np.zeros((64, 16, 3), np.uint8)]
    boxed, _ = static.letterbox(images)
    assert static.infer(static.to_input(boxed)).shape == (3, *KNOWN.shape)
    assert static.predict(images, conf=0.1) == dynamic.predict(images, conf=0.1)
    with pytest.raises(Exception, match=f"Got: 3 Expected: {batch}"):  # what the runtime spares its callers
        static.session.run(None, {static.input_name: static.to_input(boxed)})


def test_what_the_runtime_cannot_decode_is_refused_at_load_naming_what_is_supported(tmp_path: Path) -> None:
    end_to_end = np.zeros((300, 6), np.float32)  # YOLO26's default export: (batch, 300, x1 y1 x2 y2 conf cls)
    with pytest.raises(DetopsError, match=r"not the detection head \(batch, 4 \+ 2 classes.*end-to-end"):
        ModelRuntime.load(_write_model_dir(tmp_path / "e2e", known=end_to_end))
    with pytest.raises(DetopsError, match="input 64x96 is not square"):
        ModelRuntime.load(_write_model_dir(tmp_path / "wide", hw=(64, 96)))
    folder = _write_model_dir(tmp_path / "classes")
    ModelCard(name="x", classes=["a", "b", "c"], imgsz=IMGSZ, model_yaml="y").save(folder / CARD_FILE)
    with pytest.raises(DetopsError, match=r"4 \+ 3 classes"):
        ModelRuntime.load(folder)


def test_mutant_runtime_without_chunks_fails_on_a_static_batch_model(tmp_path: Path) -> None:
    from tests.mutants.own_data import runtime_without_chunks

    runtime = ModelRuntime.load(_write_model_dir(tmp_path / "static", batch=1), threads=1)
    images = [np.zeros((64, 64, 3), np.uint8)] * 3
    with runtime_without_chunks(), pytest.raises(Exception, match="Got: 3 Expected: 1"):
        runtime.predict(images, conf=0.1)
    assert len(runtime.predict(images, conf=0.1)) == 3


def test_the_detect_body_is_exactly_what_its_documented_model_dumps() -> None:
    """The service builds /detect bodies as plain dicts (per image, on the hot path); the pydantic
    models that document them must read them back unchanged, field for field and in order."""
    from pipelines.types import Box, Detection
    from serving.schemas import DetectResponse, ModelInfo, detect_response

    dets = [Detection(Box(1.5, 2.0, 30.25, 40.0), 1, 0.875, 0.5), Detection(Box(0.0, 0.0, 1.0, 1.0), 0, 0.1, 0.2)]
    body = detect_response(64, 48, "ab" * 32, dets, ["square", "circle"], ModelInfo(name="m", version="3", alias=None))
    assert DetectResponse.model_validate(body).model_dump() == body
    assert list(body) == list(DetectResponse.model_fields)
    assert [d["class_name"] for d in body["detections"]] == ["circle", "square"]
