"""`detops import`: bring an existing ultralytics detector under the lifecycle.

The source is an ultralytics `.pt` (exported here to ONNX with a dynamic batch, as `detops train` does),
or an ONNX file exported by ultralytics (`yolo export format=onnx`: fp32 or fp16, static batch 1 by
default or dynamic, any square size), or an int8 QDQ copy of one made with onnxruntime as
`detops quantize` does. Class names, input size and stride come from the metadata ultralytics writes
into the model. With a labeling config the classes are checked by name (same names, same order) or
mapped (the config's classes picked from the model's output channels in the config's order: a COCO
model serving a 3-class project). What the runtime cannot decode (an end-to-end NMS-free head such as
YOLO26's default export, segmentation/pose/OBB/classification heads, a non-square input) is refused
here with a message, never later.

The result is a model folder like a trained one (`model.onnx`, `model_card.json`, `best.pt` for a .pt
source, so `train.weights` can fine-tune it), recorded by one MLflow run whose `detops.source*` tags
`detops register` copies onto the registry version: the version says where it came from.
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.model import ImportConfig
from pipelines.errors import DetopsError
from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE, SUPPORTED, WEIGHTS_FILE, ModelCard, Thresholds, check_graph


@dataclass(frozen=True)
class ImportResult:
    """What an import produced: the MLflow run, the model folder and what the card says."""

    run_id: str
    model_dir: Path
    card: ModelCard


@dataclass(frozen=True)
class _Meta:
    """What ultralytics' metadata says about an exported model."""

    names: list[str]
    imgsz: int | None
    stride: int
    description: str


def read_metadata(model: Any, where: Path) -> _Meta:
    """Class names (by id), input size and stride from an ONNX model's ultralytics metadata
    (`metadata_props`, values written with str()); refuse a task other than detect or an end-to-end head."""
    props = {p.key: p.value for p in model.metadata_props}
    if "names" not in props:
        raise DetopsError(f"{where}: no ultralytics metadata (names, imgsz, stride): export the model with "
                          "ultralytics (`yolo export format=onnx`) or import its .pt")
    try:
        names_by_id = ast.literal_eval(props["names"])
        imgsz = ast.literal_eval(props["imgsz"]) if "imgsz" in props else None
        stride = int(props.get("stride", 32))
    except (ValueError, SyntaxError) as exc:
        raise DetopsError(f"{where}: unreadable ultralytics metadata ({exc})") from None
    if props.get("task", "detect") != "detect":
        raise DetopsError(f"{where}: a {props['task']} model; {SUPPORTED}")
    if props.get("end2end") == "True":
        raise DetopsError(f"{where}: an end-to-end (NMS-free) export; {SUPPORTED} (a YOLO26 .pt is not "
                          "supported either: its head is end-to-end)")
    if isinstance(imgsz, (list, tuple)):
        if len(set(imgsz)) != 1:
            raise DetopsError(f"{where}: input {imgsz[0]}x{imgsz[1]} is not square; {SUPPORTED}")
        imgsz = imgsz[0]
    names = [str(names_by_id[i]) for i in sorted(names_by_id)]
    return _Meta(names, imgsz, stride, props.get("description", ""))


def class_channels(model_names: list[str], wanted: list[str], mode: str, config: Path) -> list[int] | None:
    """The model's class channels, in the labeling config's order (None: keep the model's as they are).
    `check` wants the same names in the same order; `map` wants every wanted name among the model's."""
    if model_names == wanted:
        return None
    missing = [n for n in wanted if n not in model_names]
    if mode == "check" or missing:
        extra = [n for n in model_names if n not in wanted]
        details = "; ".join(part for part in (
            f"not in the model: {', '.join(missing)}" if missing else "",
            f"not in the labeling config: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}"
            if extra and mode == "check" else "",
            "same names in another order" if not missing and not extra else "") if part)
        hint = "" if missing else " (import.classes: map picks and reorders the config's classes)"
        raise DetopsError(f"model classes differ from {config}: {details}{hint}")
    return [model_names.index(n) for n in wanted]


def select_classes(model: Any, channels: list[int]) -> Any:
    """The ONNX model with its output (N, 4 + nc, anchors) cut to the box rows and `channels`, in that
    order: one Gather appended to the graph (works on fp32, fp16 and QDQ graphs alike)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    output = graph.output[0]
    raw = f"{output.name}_all_classes"
    for node in graph.node:
        node.output[:] = [raw if o == output.name else o for o in node.output]
    indices = np.array([0, 1, 2, 3, *(4 + c for c in channels)], np.int64)
    graph.initializer.append(numpy_helper.from_array(indices, "detops_class_channels"))
    graph.node.append(helper.make_node("Gather", [raw, "detops_class_channels"], [output.name], axis=1,
                                       name="detops_select_classes"))
    dims = output.type.tensor_type.shape.dim
    dims[1].ClearField("dim_param")
    dims[1].dim_value = len(indices)
    return model


def _onnx_from_weights(weights: Path, imgsz: int | None, dest: Path) -> None:
    """Export an ultralytics .pt to `dest` (dynamic batch, square `imgsz`, its training size by default)."""
    from ultralytics import YOLO

    from pipelines import environment
    from training.train import export_onnx

    environment.configure_ultralytics()
    try:
        model = YOLO(str(weights))
    except Exception as exc:  # torch/ultralytics raise many types for a file that is not a checkpoint
        raise DetopsError(f"{weights}: not an ultralytics checkpoint ({type(exc).__name__}: {exc})") from None
    head = model.model.model[-1]
    if model.task != "detect" or type(head).__name__ != "Detect":
        raise DetopsError(f"{weights}: a {model.task} model with a {type(head).__name__} head; {SUPPORTED}")
    if getattr(head, "end2end", False):
        raise DetopsError(f"{weights}: an end-to-end (NMS-free) head; {SUPPORTED}")
    size = imgsz or int(model.ckpt.get("train_args", {}).get("imgsz", 0) or 640)
    with tempfile.TemporaryDirectory(prefix=".import-") as tmp:
        # ultralytics exports next to the weights: work on a copy (the source may be read-only).
        copy = Path(tmp) / weights.name
        shutil.copy2(weights, copy)
        export_onnx(YOLO(str(copy)), size, dest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_model(cfg: ImportConfig) -> ImportResult:
    """Write the model folder `cfg.out` from `cfg.source` (replacing its model files only on success)
    and record the import as an MLflow run of `cfg.experiment`."""
    import onnx
    import onnxruntime as ort

    from labeling.studio import load_labeling_config
    from training.train import _parent

    source = cfg.source
    if source is None:
        raise DetopsError("import.source: give the model file (--source best.pt or model.onnx)")
    source = Path(source)
    if not source.is_file():
        raise DetopsError(f"{source}: not found")
    kind = {".pt": "ultralytics-pt", ".onnx": "ultralytics-onnx"}.get(source.suffix.lower())
    if kind is None:
        raise DetopsError(f"{source}: expected an ultralytics .pt or .onnx file")
    if cfg.imgsz is not None and kind != "ultralytics-pt":
        raise DetopsError("import.imgsz: only for a .pt source (an ONNX model's input size is fixed)")
    wanted = load_labeling_config(cfg.labeling_config).class_names if cfg.labeling_config else None

    with tempfile.TemporaryDirectory(prefix=".import-", dir=_parent(cfg.out)) as tmp:
        staging = Path(tmp)
        onnx_path = staging / MODEL_FILE
        if kind == "ultralytics-pt":
            _onnx_from_weights(source, cfg.imgsz, onnx_path)
            shutil.copy2(source, staging / WEIGHTS_FILE)
        else:
            shutil.copy2(source, onnx_path)
        try:
            model = onnx.load(str(onnx_path))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise DetopsError(f"{source}: not an ONNX model ({type(exc).__name__}: {exc})") from None
        meta = read_metadata(model, source)
        names = meta.names
        if wanted is not None:
            channels = class_channels(names, wanted, cfg.classes, cfg.labeling_config)
            if channels is not None:
                onnx.save(select_classes(model, channels), str(onnx_path))
                names = wanted
        try:
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types
            raise DetopsError(f"{source}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None
        shape = session.get_inputs()[0].shape
        imgsz = meta.imgsz or (shape[2] if isinstance(shape[2], int) else None)
        if imgsz is None:
            raise DetopsError(f"{source}: neither its metadata nor its input {shape} gives the input size")
        check_graph(session, len(names), imgsz, source)

        provenance = {"kind": "import", "format": kind, "file": source.name, "sha256": _sha256(source),
                      "description": meta.description, "batch": str(shape[0]),
                      "input_type": session.get_inputs()[0].type}
        return _record(cfg, staging, names, imgsz, meta.stride, provenance)


def _record(cfg: ImportConfig, staging: Path, names: list[str], imgsz: int, stride: int,
            provenance: dict[str, str]) -> ImportResult:
    """One MLflow run for the import (params, provenance tags, the model files), then the folder."""
    import mlflow

    from pipelines.tracking import ensure_experiment
    from training.train import _version_tags, _versions

    ensure_experiment(cfg.experiment)
    with mlflow.start_run(run_name=f"import {provenance['file']}") as run:
        run_id = run.info.run_id
        mlflow.log_params({"source": str(cfg.source), "imgsz": imgsz, "classes": cfg.classes,
                           "labeling_config": str(cfg.labeling_config), "n_classes": len(names)})
        source_tags = {f"detops.source.{k}": provenance[k] for k in ("kind", "format", "file", "sha256")}
        mlflow.set_tags({**source_tags, **_version_tags(), **cfg.tags})
        card = ModelCard(name=Path(provenance["file"]).stem, classes=names, imgsz=imgsz, stride=stride,
                         thresholds=Thresholds(), run_id=run_id, model_yaml=f"imported:{provenance['file']}",
                         versions=_versions(), source=provenance)
        card.save(staging / CARD_FILE)
        for name in (WEIGHTS_FILE, MODEL_FILE, CARD_FILE):
            if (staging / name).is_file():
                mlflow.log_artifact(str(staging / name), artifact_path="imported_model")
        _publish(staging, Path(cfg.out))
    return ImportResult(run_id=run_id, model_dir=Path(cfg.out), card=card)


def _publish(staging: Path, out: Path) -> None:
    """Move the files into `out`, the card last (readers key on it). A calibrator or weights left by
    the previous model are removed: they do not describe this one."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (CALIBRATOR_FILE, WEIGHTS_FILE):
        (out / stale).unlink(missing_ok=True)
    for name in (WEIGHTS_FILE, MODEL_FILE, CARD_FILE):
        if (staging / name).is_file():
            (staging / name).replace(out / name)
