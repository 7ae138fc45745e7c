"""`detops train`: train an ultralytics YOLO detector from a model YAML, track it in MLflow, export
ONNX and write the model folder (`best.pt`, `model.onnx`, `model_card.json`).

One training gives exactly one MLflow run: ultralytics' own MLflow/DVC callbacks are switched off
(`environment.configure_ultralytics`) and this module logs params, per-epoch metrics, tags and
artifacts itself. The ONNX model has a dynamic batch dimension and a fixed square input of `imgsz`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pipelines import environment
from pipelines.config.model import TrainConfig
from pipelines.errors import DetopsError
from pipelines.tracking import metric_name
from pipelines.types import YoloDataset
from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE, WEIGHTS_FILE, ModelCard, Thresholds

ONNX_OPSET = 18  # what ultralytics picks for torch >= 2.4; ONNX Runtime 1.31 runs it on CPU
# Train arguments this module sets itself: `hyp` may not override them.
_MANAGED = {"data", "model", "project", "name", "exist_ok", "pretrained", "plots", "mode", "task"}


@dataclass(frozen=True)
class TrainResult:
    """What a training produced: the MLflow run, the model folder and the best model's metrics."""

    run_id: str
    model_dir: Path
    save_dir: Path  # ultralytics' run folder (curves, last.pt, results.csv)
    metrics: dict[str, float]


def train(cfg: TrainConfig) -> TrainResult:
    """Train, export and publish the model folder `cfg.out`; log everything to one MLflow run."""
    dataset = YoloDataset.load(cfg.dataset)
    if "train" not in dataset.splits or "val" not in dataset.splits:
        raise DetopsError(f"{dataset.yaml_path}: needs 'train' and 'val' splits (has {list(dataset.splits)})")
    if not dataset.images("train"):
        raise DetopsError(f"{dataset.image_dir('train')}: no training images")
    environment.configure_ultralytics()
    train_args = _train_args(cfg)

    import mlflow
    from ultralytics import YOLO

    from pipelines.tracking import ensure_experiment

    model = _build_model(cfg.model, cfg.weights)
    ensure_experiment(cfg.experiment)
    data_hash, hash_source = dataset_hash(cfg.dataset)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_params(_flatten(cfg.model_dump(mode="json")))
        mlflow.set_tags({"dataset_hash": data_hash, "dataset_hash_source": hash_source,
                         "dataset": str(cfg.dataset), **_git_tags(), **_version_tags(), **cfg.tags})
        model.add_callback("on_fit_epoch_end", _log_epoch)
        model.add_callback("on_pretrain_routine_start", _cpu_setup(cfg.workers))
        model.train(**train_args, project=str(cfg.runs.resolve()), name=run_id)
        trainer = model.trainer
        best = Path(trainer.best)
        if not best.is_file():
            raise DetopsError(f"training wrote no {best} (did every epoch fail?)")
        metrics = {metric_name(k): float(v) for k, v in trainer.metrics.items()}
        mlflow.log_metrics({f"best/{k}": v for k, v in metrics.items()})

        with tempfile.TemporaryDirectory(prefix=".train-", dir=_parent(cfg.out)) as tmp:
            staging = Path(tmp)
            shutil.copy2(best, staging / WEIGHTS_FILE)
            export_onnx(YOLO(str(staging / WEIGHTS_FILE)), cfg.imgsz, staging / MODEL_FILE)
            card = ModelCard(name=Path(cfg.model).stem, classes=dataset.class_names, imgsz=cfg.imgsz,
                             stride=int(max(trainer.model.stride)), thresholds=Thresholds(), run_id=run_id,
                             model_yaml=cfg.model, versions=_versions())
            card.save(staging / CARD_FILE)
            (staging / "classes.json").write_text(json.dumps(dataset.class_names, indent=2) + "\n")
            for name in (WEIGHTS_FILE, MODEL_FILE, CARD_FILE, "classes.json"):
                mlflow.log_artifact(str(staging / name), artifact_path="trained_model")
            for name in ("results.png", "results.csv"):
                if (trainer.save_dir / name).is_file():
                    mlflow.log_artifact(str(trainer.save_dir / name), artifact_path="training")
            _write_report(cfg.report, trainer.save_dir, metrics, run_id)
            _publish(staging, cfg.out)
    return TrainResult(run_id=run_id, model_dir=cfg.out, save_dir=Path(trainer.save_dir), metrics=metrics)


def _train_args(cfg: TrainConfig) -> dict[str, Any]:
    """ultralytics train arguments from the config; `hyp` keys must be real ultralytics arguments."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    args = {"data": str(Path(cfg.dataset) / "dataset.yaml"), "imgsz": cfg.imgsz, "epochs": cfg.epochs,
            "batch": cfg.batch, "lr0": cfg.lr0, "optimizer": cfg.optimizer, "patience": cfg.patience,
            "seed": cfg.seed, "deterministic": cfg.deterministic, "device": cfg.device,
            "workers": cfg.workers, "exist_ok": True, "plots": True,
            # False builds fresh weights from the architecture even when the model was loaded from a .pt:
            # fine-tuning (train.weights) must hand the weights over explicitly.
            "pretrained": str(cfg.weights) if cfg.weights is not None else False}
    for key, value in cfg.hyp.items():
        if key not in DEFAULT_CFG_DICT:
            raise DetopsError(f"train.hyp.{key}: not an ultralytics train argument")
        if key in args or key in _MANAGED:
            hint = f"; use train.{key}" if key in TrainConfig.model_fields else ""
            raise DetopsError(f"train.hyp.{key}: set by detops, not a pass-through argument{hint}")
        args[key] = value
    try:
        check_cfg(dict(args))  # types and ranges, before an MLflow run is opened
    except (TypeError, ValueError) as exc:
        raise DetopsError(f"train: {' '.join(str(exc).split())}") from None
    return args


def _build_model(model_yaml: str, weights: Path | None = None) -> Any:
    """A YOLO model built from its YAML (fresh weights: nothing is downloaded), or loaded from local
    `weights` to fine-tune."""
    from ultralytics import YOLO

    if weights is not None:
        if not Path(weights).is_file():
            raise DetopsError(f"train.weights: {weights} not found (a best.pt of a trained detops model)")
        return YOLO(str(weights), task="detect")

    if not model_yaml.endswith((".yaml", ".yml")):
        raise DetopsError(f"train.model: expected a model YAML such as yolov8n.yaml (got {model_yaml!r}); "
                          "pretrained weights cannot be downloaded here")
    try:
        return YOLO(model_yaml, task="detect")
    except FileNotFoundError:
        raise DetopsError(f"train.model: no model YAML named {model_yaml!r} (ultralytics ships "
                          "yolov8n.yaml, yolo11n.yaml, yolo26n.yaml, ...)") from None


def export_onnx(model: Any, imgsz: int, dest: Path) -> Path:
    """Export `model` to ONNX at `dest` with a dynamic batch and a fixed `imgsz` x `imgsz` input.

    ultralytics' `dynamic=True` makes batch, height and width dynamic; the graph it traces is
    shape-generic, so pinning height/width afterwards (and letting onnxslim fold the now-constant
    shape arithmetic) leaves only the batch dynamic."""
    import onnx
    import onnxslim

    exported = Path(model.export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, opset=ONNX_OPSET,
                                 batch=1, device="cpu"))
    graph = onnx.load(str(exported))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    for dim in dims[2:]:
        dim.ClearField("dim_param")
        dim.dim_value = imgsz
    output_dims = graph.graph.output[0].type.tensor_type.shape.dim
    output_dims[2].ClearField("dim_param")  # anchors: fixed once the input size is
    output_dims[2].dim_value = sum((imgsz // int(s)) ** 2 for s in model.model.stride)
    metadata = list(graph.metadata_props)
    graph = onnxslim.slim(graph)
    del graph.metadata_props[:]
    graph.metadata_props.extend(metadata)  # ultralytics reads names/stride/imgsz from these
    onnx.checker.check_model(graph)
    onnx.save(graph, str(dest))
    exported.unlink()
    return dest


def dataset_hash(dataset: Path) -> tuple[str, str]:
    """(hash, source): the md5 DVC recorded for `dataset` in ./dvc.lock when there is one, else a
    sha256 of the folder's relative paths and file contents."""
    lock = Path("dvc.lock")
    if lock.is_file():
        wanted = Path(dataset).resolve()
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if Path(out.get("path", "")).resolve() == wanted and out.get("md5"):
                    return str(out["md5"]), "dvc.lock md5"
    digest = hashlib.sha256()
    root = Path(dataset)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.suffixes):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), "content sha256"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), at least 1."""
    import os

    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(os.cpu_count() or 1, 1)


def _cpu_setup(workers: int) -> Callable[[Any], None]:
    """An ultralytics `on_pretrain_routine_start` callback that undoes two CPU defaults of its trainer,
    which runs after `select_device` and before the dataloaders are built:

    - `select_device` sets torch to `cpu_count - 1` threads on CPU (one of two cores idle here): use every
      usable core. Same machine, same thread count, same results (docs/performance.md measured it);
    - the trainer forces `workers = 0` on CPU: keep `train.workers` (measured in docs/performance.md)."""

    def setup(trainer: Any) -> None:
        import torch

        if getattr(trainer.device, "type", "cpu") == "cpu":
            torch.set_num_threads(usable_cores())
            trainer.args.workers = workers

    return setup


def _log_epoch(trainer: Any) -> None:
    """ultralytics callback: this epoch's train losses, validation metrics and learning rates."""
    import mlflow

    values = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.metrics, **trainer.lr}
    mlflow.log_metrics({metric_name(k): float(v) for k, v in values.items()}, step=trainer.epoch + 1)


def _write_report(report: Path, save_dir: Path, metrics: dict[str, float], run_id: str) -> None:
    """DVC metrics (best model) and plots (per-epoch curves) for `dvc metrics/plots`."""
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(json.dumps({**metrics, "run_id": run_id}, indent=2) + "\n")
    for name in ("results.csv", "results.png"):
        if (save_dir / name).is_file():
            shutil.copy2(save_dir / name, report / name)


def _publish(staging: Path, out: Path) -> None:
    """Move the finished files into `out`, the card last (readers key on it). A calibrator left by
    the previous model's evaluation is removed: it does not describe this model."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CALIBRATOR_FILE).unlink(missing_ok=True)
    for name in (WEIGHTS_FILE, MODEL_FILE, CARD_FILE):
        (staging / name).replace(out / name)


def _parent(out: Path) -> Path:
    # Staging next to `out` keeps the final moves on one filesystem (atomic renames).
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _git_tags() -> dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout, or no git
        return {}
    return {"git_sha": sha.strip(), "git_dirty": str(bool(dirty.strip())).lower()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "ultralytics", "onnx", "onnxruntime", "mlflow", "numpy", "opencv-python"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _version_tags() -> dict[str, str]:
    return {f"version.{k}": v for k, v in _versions().items()}
