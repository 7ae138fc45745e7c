"""Model verbs: train, import, tune, evaluate, quantize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.common import app, user_errors
from pipelines.config.base import load_section
from pipelines.config.model import EvaluateConfig, ImportConfig, QuantizeConfig, TrainConfig, TuneConfig
from pipelines.errors import DetopsError


@app.command(rich_help_panel="Model")
@user_errors
def train(
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder (with dataset.yaml)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="model folder: best.pt, model.onnx, model_card.json")] = None,
    model: Annotated[Optional[str], typer.Option(help="ultralytics model YAML, e.g. yolov8n.yaml")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help="square input size, a multiple of 32")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="training epochs")] = None,
    batch: Annotated[Optional[int], typer.Option(help="batch size")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, 0, 0,1 ...")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="extra run tag KEY=VALUE (repeatable), e.g. "
                                                     "detops.feedback_batch=fb-7")] = None,
) -> None:
    """Train YOLO from a model YAML, log one MLflow run, export ONNX and write the model folder."""
    from training.train import train as run

    bad = [t for t in tag or () if "=" not in t or not t.split("=", 1)[0]]
    if bad:
        raise DetopsError(f"--tag {bad[0]!r}: expected KEY=VALUE")
    tags = {**load_section(TrainConfig).tags, **dict(t.split("=", 1) for t in tag or ())}
    cfg = load_section(TrainConfig, dataset=dataset, out=out, model=model, imgsz=imgsz, epochs=epochs, batch=batch,
                       device=device, experiment=experiment, tags=tags or None)
    result = run(cfg)
    best = ", ".join(f"{k.removeprefix('metrics/')}={v:.3f}" for k, v in result.metrics.items())
    typer.echo(f"run {result.run_id}: {result.model_dir} ({best})")


@app.command(name="import", rich_help_panel="Model")
@user_errors
def import_model(
    source: Annotated[Optional[Path], typer.Option(help="ultralytics .pt, or its ONNX export (fp32/fp16, "
                                                  "static or dynamic batch, int8 QDQ)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="model folder: model.onnx, model_card.json (best.pt)")] = None,
    labeling_config: Annotated[Optional[Path], typer.Option("--labeling-config", help="check or map the "
                                                            "model's classes against this config, by name")] = None,
    classes: Annotated[Optional[str], typer.Option(help="check (same names, same order) or map (pick and "
                                                   "reorder the config's classes)")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help=".pt only: ONNX input size (default: its training size)")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment of the import's run")] = None,
) -> None:
    """Bring an existing ultralytics detector into a model folder; then evaluate, register, build as usual."""
    from training.importer import import_model as run

    cfg = load_section(ImportConfig, source=source, out=out, labeling_config=labeling_config, classes=classes,
                       imgsz=imgsz, experiment=experiment)
    result = run(cfg)
    card = result.card
    typer.echo(f"run {result.run_id}: {result.model_dir} ({card.source['format']} {card.source['file']}, "
               f"{len(card.classes)} classes, imgsz {card.imgsz}, batch {card.source['batch']}, "
               f"input {card.source['input_type']})")


@app.command(rich_help_panel="Model")
@user_errors
def tune(
    n_trials: Annotated[Optional[int], typer.Option("--n-trials", help="trials to run in this invocation")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="epochs per trial")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (sqlite:///..., postgresql://...)")] = None,
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="Optuna study (shared across machines)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="YAML file for the best train: params")] = None,
) -> None:
    """Optuna search over tune.space, each trial a real training (nested MLflow runs); writes the best params."""
    from training.tune import tune as run

    cfg = load_section(TuneConfig, n_trials=n_trials, epochs=epochs, storage=storage, study_name=study_name, out=out)
    result = run(cfg, load_section(TrainConfig))
    typer.echo(f"study {result.study_name}: {result.n_trials} trials, best mAP50-95 {result.best_value:.4f} "
               f"{result.best_params} -> {result.out} (MLflow parent run {result.parent_run_id})")


@app.command(rich_help_panel="Model")
@user_errors
def evaluate(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="model folder (model.onnx, model_card.json)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder (val and test splits)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="report folder")] = None,
    variant: Annotated[Optional[str], typer.Option(help="fp32, or int8 for the quantized copy (`detops quantize`)")] = None,
) -> None:
    """COCO mAP, D-ECE and latency of the ONNX model on test; fit its calibrator on val."""
    from rich.console import Console

    from evaluation.evaluate import evaluate as run

    cfg = load_section(EvaluateConfig, model_dir=model_dir, dataset=dataset, out=out, variant=variant)
    m = run(cfg)
    Console().print(f"[green]evaluated[/green] {m['n_test_images']} test images: mAP50-95 {m['map50_95']:.3f}, "
                    f"mAP50 {m['map50']:.3f}, D-ECE {m['dece']:.3f} -> {m['dece_calibrated']:.3f} "
                    f"({m['calibration']['method']}), latency {m['latency_ms_batch1']:.1f} ms; "
                    f"report {cfg.out / 'metrics.json'}")


@app.command(rich_help_panel="Model")
@user_errors
def quantize(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="fp32 model folder (model.onnx, model_card.json)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder (calibration images: quantize.calibration_splits)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="int8 model folder")] = None,
) -> None:
    """Static int8 (QDQ) copy of the ONNX model, calibrated on train images; evaluate it with
    `detops evaluate --model-dir OUT --out quantize.evaluation`."""
    from evaluation.quantize import quantize as run

    cfg = load_section(QuantizeConfig, model_dir=model_dir, dataset=dataset, out=out)
    folder = run(cfg)
    typer.echo(f"int8 model: {folder / 'model.onnx'} (calibrated on {cfg.calibration_images} images of "
               f"{', '.join(cfg.calibration_splits)})")
