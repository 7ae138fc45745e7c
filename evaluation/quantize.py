"""`detops quantize`: a statically quantized int8 (QDQ) copy of the trained ONNX model, and the gate
that decides which of the two `detops register` registers and serving serves.

The int8 model is calibrated on train images only (never test, which judges it), letterboxed exactly as
served (serving/runtime.py). The detection head's decoding (DFL softmax, box arithmetic, the final
concat of boxes and scores) stays in float by default: quantizing box coordinates of up to `imgsz`
pixels to 8 bits would cost a few pixels per edge. Its folder (`quantize.out`) holds the int8
`model.onnx` and the same `model_card.json`; `detops evaluate --model-dir <out> --out <evaluation>`
evaluates it exactly as the fp32 model (COCO mAP, its own calibrator and D-ECE, latency, smoke sample).

`choose_variant` is the gate: int8 only when the lower bound of the paired-bootstrap interval of
mAP@.5:.95(int8) - mAP@.5:.95(fp32) on the test split is above `-quantize.max_map_drop` and the int8
model's calibrated D-ECE passes `register.gates.max_dece_calibrated` and it answers one request through
the service's own path no slower than fp32 (`latency_ms_served_single`, serving/latency.py); otherwise
fp32. The decision and
both variants' figures go to `<fp32 evaluation>/variant.json`, the registry version's tags and
description, and the run's metrics.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config.model import QuantizeConfig
from pipelines.errors import DetopsError
from pipelines.images import read_rgb
from pipelines.types import YoloDataset

VARIANT_FILE = "variant.json"

CALIBRATION_BATCH = 8  # images per calibration run of a dynamic-batch model


def quantize(cfg: QuantizeConfig) -> Path:
    """Write the int8 model folder `cfg.out` from the fp32 one in `cfg.model_dir`."""
    from serving.runtime import CARD_FILE, MODEL_FILE

    source = Path(cfg.model_dir)
    for name in (MODEL_FILE, CARD_FILE):
        if not (source / name).is_file():
            raise DetopsError(f"{source}: no {name} (run `detops train` first)")
    images = calibration_images(cfg)
    out = quantize_model(source, Path(cfg.out), images, per_channel=cfg.per_channel, float_tail=cfg.float_tail)
    (out / "quantization.json").write_text(json.dumps({
        "source": str(source / MODEL_FILE), "format": "QDQ", "activations": "uint8", "weights": "int8",
        "per_channel": cfg.per_channel, "float_tail": cfg.float_tail, "calibration_splits": cfg.calibration_splits,
        "calibration_images": [p.name for p in images]}, indent=2) + "\n")
    return out


def quantize_model(source: Path, out: Path, images: list[Path] | list[np.ndarray], *, per_channel: bool = True,
                   float_tail: bool = True) -> Path:
    """The int8 QDQ copy of the model folder `source` (model.onnx, model_card.json) in `out`, calibrated
    on `images` (files or RGB arrays) letterboxed as served. Also used by the serving benchmark."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from serving.runtime import CARD_FILE, MODEL_FILE, ModelRuntime

    runtime = ModelRuntime.load(source, calibrated=False)
    input_name = runtime.session.get_inputs()[0].name
    # A static-batch model (ultralytics' default export: 1) takes exactly its batch size per run. A
    # short last batch is filled with images from the start: repeating an image leaves MinMax ranges as
    # they are, where zero padding would add a black image's activations to them.
    size = runtime.static_batch or CALIBRATION_BATCH
    if not images:
        raise DetopsError("no calibration images")
    filled = list(images) + [images[i % len(images)] for i in range(-len(images) % size)]

    class Reader(CalibrationDataReader):
        """The calibration images, letterboxed and normalised as served, a batch of `size` per call."""

        def __init__(self) -> None:
            self._batches = iter([filled[i:i + size] for i in range(0, len(filled), size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            paths = next(self._batches, None)
            if paths is None:
                return None
            rgb = [p if isinstance(p, np.ndarray) else read_rgb(p) for p in paths]
            return {input_name: runtime.to_input(runtime.letterbox(rgb)[0])}

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference is skipped: the graph's shapes are already static but for the batch.
        quant_pre_process(str(source / MODEL_FILE), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / MODEL_FILE
        quantize_static(str(prepared), str(staged), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=float_tail_nodes(prepared) if float_tail else [])
        staged.replace(out / MODEL_FILE)
    shutil.copy2(source / CARD_FILE, out / CARD_FILE)
    return out


def calibration_images(cfg: QuantizeConfig) -> list[Path]:
    """At most `cfg.calibration_images` images of the calibration splits, evenly spaced by name."""
    if "test" in cfg.calibration_splits:  # also refused by the config; the test split judges the model
        raise DetopsError("quantize.calibration_splits: the test split may not calibrate the model it judges")
    dataset = YoloDataset.load(cfg.dataset)
    paths = sorted((p for split in cfg.calibration_splits for p in dataset.images(split)), key=lambda p: p.name)
    if not paths:
        raise DetopsError(f"{cfg.dataset}: no images in {cfg.calibration_splits} to calibrate the int8 model")
    n = min(cfg.calibration_images, len(paths))
    return [paths[round(i * (len(paths) - 1) / max(n - 1, 1))] for i in range(n)]


def float_tail_nodes(model_path: Path) -> list[str]:
    """The nodes of the detection head that decode its outputs (everything of the last module but its
    convolution branches): they stay in float."""
    import onnx

    names = [n.name for n in onnx.load(str(model_path)).graph.node]
    modules = [int(n.split("/")[1].split(".")[1]) for n in names if n.startswith("/model.")]
    if not modules:
        raise DetopsError(f"{model_path}: not an ultralytics export (no /model.N/ node names)")
    head = f"/model.{max(modules)}/"
    return [n for n in names if n.startswith(head) and "/cv" not in n]


@dataclass(frozen=True)
class VariantDecision:
    """Which model folder is registered and served, why, and both variants' figures."""

    chosen: str  # "fp32" or "int8"
    reason: str
    model_dir: str
    evaluation: str
    delta_map50_95: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    fp32: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIGURES = ("map50_95", "map50", "dece", "dece_calibrated", "latency_ms_batch1",
           "latency_ms_per_image_best_batch", "latency_ms_served_single")


def choose_variant(cfg: QuantizeConfig, fp32_dir: Path, fp32_evaluation: Path, max_dece_calibrated: float,
                   bootstrap_samples: int, seed: int) -> VariantDecision:
    """The gate between the fp32 model and its int8 copy (both evaluated); writes variant.json next to
    the fp32 evaluation. Without an int8 evaluation (quantize.enabled false, or not run) it is fp32."""
    from evaluation.coco import bootstrap_map_delta

    fp32 = _figures(fp32_evaluation)
    int8_eval = Path(cfg.evaluation)
    why = None
    if not cfg.enabled:
        why = "quantize.enabled is false"
    elif Path(cfg.model_dir).resolve() != Path(fp32_dir).resolve():
        why = f"the int8 copy ({cfg.out}) is of {cfg.model_dir}, not of {fp32_dir}"
    elif not (int8_eval / "metrics.json").is_file():
        why = f"no int8 evaluation in {int8_eval}"
    if why:
        decision = VariantDecision("fp32", why, str(fp32_dir), str(fp32_evaluation), fp32=fp32)
    else:
        gt = _read(fp32_evaluation / "coco_gt.json")
        if _read(int8_eval / "coco_gt.json") != gt:
            raise DetopsError(f"{int8_eval}: the int8 model was evaluated on other images than the fp32 one "
                              f"({fp32_evaluation}); re-run both evaluations")
        delta, low, high = bootstrap_map_delta(gt, _read(fp32_evaluation / "coco_dt.json"),
                                               _read(int8_eval / "coco_dt.json"), n=bootstrap_samples, seed=seed)
        int8 = _figures(int8_eval)
        accurate = low > -cfg.max_map_drop
        calibrated = int8["dece_calibrated"] <= max_dece_calibrated
        speedup = fp32["latency_ms_batch1"] / int8["latency_ms_batch1"] if int8["latency_ms_batch1"] else None
        served_fp32, served_int8 = fp32.get("latency_ms_served_single"), int8.get("latency_ms_served_single")
        # A client waits for the service's path, not the engine's: at small sizes int8 can win in the
        # engine and still not answer one request sooner (serving/latency.py). Evaluations older than
        # this figure are judged without it.
        fast = served_fp32 is None or served_int8 is None or served_int8 <= served_fp32
        interval = f"mAP@.5:.95 int8 - fp32 {delta:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}]"
        if accurate and calibrated and fast:
            served = (f"; one request through the service's path {served_int8:.1f} ms vs {served_fp32:.1f} ms"
                      if served_fp32 is not None and served_int8 is not None else "")
            chosen, why = "int8", (f"int8 as good: {interval} (lower bound > -{cfg.max_map_drop:g}), calibrated "
                                   f"D-ECE {int8['dece_calibrated']:.4f} <= {max_dece_calibrated:g}; "
                                   f"single-image latency {speedup:.2f}x faster{served}")
        else:
            failed = [f"{interval} (lower bound <= -{cfg.max_map_drop:g})"] if not accurate else []
            failed += [f"int8 calibrated D-ECE {int8['dece_calibrated']:.4f} > {max_dece_calibrated:g}"] if not calibrated else []
            failed += [(f"int8 is slower for one request through the service's path ({served_int8:.1f} ms vs "
                        f"fp32 {served_fp32:.1f} ms)")] if not fast else []
            chosen, why = "fp32", "int8 not as good: " + "; ".join(failed)
        folder, evaluation = (cfg.out, int8_eval) if chosen == "int8" else (fp32_dir, fp32_evaluation)
        decision = VariantDecision(chosen, why, str(folder), str(evaluation), delta, low, high, fp32, int8)
    (Path(fp32_evaluation) / VARIANT_FILE).write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    return decision


def describe_variant(mlflow_client: Any, name: str, version: str, decision: VariantDecision) -> None:
    """The registry version says which variant it is and why (tags), with both variants' figures
    appended to its description."""
    mlflow_client.set_model_version_tag(name, version, "detops.precision", decision.chosen)
    mlflow_client.set_model_version_tag(name, version, "detops.precision_reason", decision.reason[:4000])
    lines = ["", f"**Variant: {decision.chosen}** ({decision.reason})", "",
             "| variant | mAP@.5:.95 | mAP@.5 | D-ECE calibrated | latency ms (1 image) |", "|---|---|---|---|---|"]
    for label, figures in (("fp32", decision.fp32), ("int8", decision.int8)):
        if figures:
            cells = [f"{figures[k]:.4g}" if isinstance(figures.get(k), (int, float)) else "-"
                     for k in ("map50_95", "map50", "dece_calibrated", "latency_ms_batch1")]
            lines.append(f"| {label}{' (registered)' if label == decision.chosen else ''} | " + " | ".join(cells) + " |")
    current = mlflow_client.get_model_version(name, version).description or ""
    mlflow_client.update_model_version(name, version, description=current + "\n".join(lines))


def _figures(evaluation: Path) -> dict[str, Any]:
    metrics = _read(Path(evaluation) / "metrics.json")
    return {k: metrics.get(k) for k in FIGURES}


def _read(path: Path) -> Any:
    if not path.is_file():
        raise DetopsError(f"{path}: not found (run `detops evaluate` first)")
    return json.loads(path.read_text())
