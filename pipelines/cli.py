"""`detops`: one verb per lifecycle stage. dvc.yaml calls these verbs; people do too.

Each verb reads its own section of params.yaml and lets options override inputs and outputs. Heavy
libraries are imported inside the verbs so that `detops --help` stays fast.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pipelines import environment
from pipelines.config import PARAMS_ENV, load_section
from pipelines.errors import DetopsError

app = typer.Typer(
    name="detops",
    help="Object-detection lifecycle: Label Studio -> dataset -> YOLO -> registry -> BentoML -> drift.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    params: Annotated[Optional[Path], typer.Option("--params", help="params file (default ./params.yaml)")] = None,
) -> None:
    if params is not None:
        os.environ[PARAMS_ENV] = str(params)
    environment.configure()


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DetopsError into one red line on stderr and its exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DetopsError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


# --------------------------------------------------------------------------- data
@app.command()
@user_errors
def synthesize(
    out: Annotated[Optional[Path], typer.Option(help="output folder")] = None,
    n_images: Annotated[Optional[int], typer.Option("--n-images", help="number of images")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    shift: Annotated[Optional[str], typer.Option(help="drift: dark, blur, background, scale, unseen_class")] = None,
) -> None:
    """Generate a synthetic Label Studio project: export.json, images/, labeling_config.xml."""
    from labeling.synthetic import synthesize as run

    cfg = load_section("synthesize", out=out, n_images=n_images, seed=seed, shift=shift)
    run(cfg)


@app.command()
@user_errors
def ingest(
    export: Annotated[Optional[list[Path]], typer.Option(help="Label Studio JSON export (repeatable: merged)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output YOLO dataset folder")] = None,
    images_root: Annotated[Optional[Path], typer.Option("--images-root", help="where the images live locally")] = None,
    labeling_config: Annotated[Optional[Path], typer.Option("--labeling-config", help="labeling config XML")] = None,
) -> None:
    """Convert a Label Studio export into a split YOLO dataset and an ingest report."""
    from labeling.ingest import ingest as run

    exports = export[0] if export and len(export) == 1 else export or None
    cfg = load_section("ingest", export=exports, out=out, images_root=images_root, labeling_config=labeling_config)
    report = run(cfg)
    typer.echo(f"ingest: {report.images_written} images {report.images_per_split} -> {cfg.out}")


@app.command()
@user_errors
def pull(
    project: Annotated[int, typer.Option(help="Label Studio project id")],
    out: Annotated[Path, typer.Option(help="folder for export.json, labeling_config.xml and images/")],
) -> None:
    """Export a project from a live Label Studio server (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)."""
    from labeling.studio import pull as run

    run(project_id=project, out=out)


@app.command()
@user_errors
def validate(
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder")] = None,
    report: Annotated[Optional[Path], typer.Option(help="report folder")] = None,
) -> None:
    """Check the dataset with Great Expectations; exit 1 when an expectation fails."""
    from rich.console import Console

    from training.validate import validate as run

    cfg = load_section("validate", dataset=dataset, report=report)
    summary = run(cfg)
    splits = ", ".join(f"{s} {n}" for s, n in summary.images_per_split.items())
    Console().print(f"[green]validation passed[/green]: {len(summary.outcomes)} expectations, "
                    f"{summary.n_images} images ({splits}), {summary.n_boxes} boxes; "
                    f"report {summary.report_dir / 'validation.html'}")


@app.command()
@user_errors
def augment(
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder")] = None,
    out: Annotated[Optional[Path], typer.Option(help="augmented dataset folder")] = None,
) -> None:
    """Write an augmented copy of the dataset (train split only) and a preview grid."""
    from rich.console import Console

    from training.augment import augment as run

    cfg = load_section("augment", dataset=dataset, out=out)
    s = run(cfg)
    Console().print(f"augment: {s.train_images} train images + {s.augmented_images} augmented "
                    f"({s.boxes_dropped} of {s.boxes_in} boxes dropped), val {s.val_images}, "
                    f"test {s.test_images} -> {s.out} in {s.seconds:.1f} s; preview {s.preview}")


# --------------------------------------------------------------------------- model: train, tune
@app.command()
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
    tags = {**load_section("train").tags, **dict(t.split("=", 1) for t in tag or ())}
    cfg = load_section("train", dataset=dataset, out=out, model=model, imgsz=imgsz, epochs=epochs, batch=batch,
                       device=device, experiment=experiment, tags=tags or None)
    result = run(cfg)
    best = ", ".join(f"{k.removeprefix('metrics/')}={v:.3f}" for k, v in result.metrics.items())
    typer.echo(f"run {result.run_id}: {result.model_dir} ({best})")


@app.command()
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

    cfg = load_section("tune", n_trials=n_trials, epochs=epochs, storage=storage, study_name=study_name, out=out)
    result = run(cfg, load_section("train"))
    typer.echo(f"study {result.study_name}: {result.n_trials} trials, best mAP50-95 {result.best_value:.4f} "
               f"{result.best_params} -> {result.out} (MLflow parent run {result.parent_run_id})")


# --------------------------------------------------------------------------- model: evaluate
@app.command()
@user_errors
def evaluate(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="model folder (model.onnx, model_card.json)")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder (val and test splits)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="report folder")] = None,
) -> None:
    """COCO mAP, D-ECE and latency of the ONNX model on test; fit its calibrator on val."""
    from rich.console import Console

    from evaluation.evaluate import evaluate as run

    cfg = load_section("evaluate", model_dir=model_dir, dataset=dataset, out=out)
    m = run(cfg)
    Console().print(f"[green]evaluated[/green] {m['n_test_images']} test images: mAP50-95 {m['map50_95']:.3f}, "
                    f"mAP50 {m['map50']:.3f}, D-ECE {m['dece']:.3f} -> {m['dece_calibrated']:.3f} "
                    f"({m['calibration']['method']}), latency {m['latency_ms_batch1']:.1f} ms; "
                    f"report {cfg.out / 'metrics.json'}")


# --------------------------------------------------------------------------- registry
@app.command()
@user_errors
def register(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="evaluated model folder")] = None,
    evaluation: Annotated[Optional[Path], typer.Option(help="evaluate's report folder (metrics.json, coco_*.json)")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="registered model name")] = None,
) -> None:
    """Gate the evaluated model, register it as a new version (@challenger) and promote it to
    @champion when every gate passes. Failed gates exit 0: the verdict is in gates.json."""
    from evaluation.registry import register as run

    cfg = load_section("register", model_dir=model_dir, evaluation=evaluation, model_name=model_name)
    run(cfg, load_section("evaluate"))


@app.command()
@user_errors
def promote(
    version: Annotated[str, typer.Argument(help="model version to make the champion")],
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="registered model name")] = None,
) -> None:
    """Point @champion at VERSION by hand (the previous champion is recorded for rollback)."""
    from evaluation.registry import promote as run

    run(load_section("register", model_name=model_name).model_name, version)


@app.command()
@user_errors
def rollback(
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="registered model name")] = None,
) -> None:
    """Point @champion back at the champion it replaced."""
    from evaluation.registry import rollback as run

    run(load_section("register", model_name=model_name).model_name)


@app.command("mlflow-ui")
@user_errors
def mlflow_ui(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
) -> None:
    """Run the MLflow UI on the project's tracking store (runs, models, aliases)."""
    from evaluation.registry import mlflow_ui as run

    code = run(host, port)
    if code:
        raise typer.Exit(code)


# --------------------------------------------------------------------------- serving
# (build goes here)
@app.command()
@user_errors
def build(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="import this local model folder "
                                                      "instead of the registry's serve.alias version")] = None,
    alias: Annotated[Optional[str], typer.Option(help="registry alias to serve (default serve.alias)")] = None,
    bento: Annotated[bool, typer.Option(help="also build the bento (--no-bento: import the model only)")] = True,
) -> None:
    """Import the model into BentoML's store and build the bento (serve: bentoml serve serving.service:Detector)."""
    from serving.build import build as run

    cfg = load_section("serve", alias=alias)
    result = run(cfg, model_dir=model_dir, bento=bento)
    source = "local folder" if model_dir else f"{cfg.model_name}@{cfg.alias} v{result.labels['registry_version']}"
    typer.echo(f"model {result.model_tag} ({source})" + (f"; bento {result.bento_tag}" if result.bento_tag else ""))


# --------------------------------------------------------------------------- monitoring
@app.command()
@user_errors
def simulate(
    url: Annotated[str, typer.Option(help="base URL of the detection service, e.g. http://127.0.0.1:3000")],
    n: Annotated[int, typer.Option("--n", help="number of images to send")] = 100,
    shift: Annotated[Optional[str], typer.Option(help="drift: dark, blur, background, scale, unseen_class")] = None,
    rate: Annotated[float, typer.Option(help="requests per second, at most")] = 5.0,
    seed: Annotated[int, typer.Option(help="generator seed (differs from training: fresh images)")] = 1000,
    timeout: Annotated[float, typer.Option(help="stop after this many seconds")] = 300.0,
) -> None:
    """POST synthetic images (in-distribution or shifted) to URL/detect; print the status codes."""
    from monitoring.simulate import simulate as run

    synth = load_section("synthesize", shift=shift)  # validates the shift name like the file would
    result = run(url, n, shift=synth.shift, rate=rate, seed=seed, timeout_s=timeout, synth=synth)
    codes = ", ".join(f"{code}: {count}" for code, count in sorted(result.status_codes.items()))
    typer.echo(f"sent {result.sent} images in {result.seconds:.1f} s ({codes})")
    if result.sent < n:
        raise DetopsError(f"simulate: stopped after {timeout:g} s with {result.sent}/{n} images sent")
    if not any(code.startswith("2") for code in result.status_codes):
        raise DetopsError(f"simulate: no request to {url} succeeded ({codes})")


@app.command()
@user_errors
def drift(
    store: Annotated[Optional[Path], typer.Option(help="prediction store folder")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="reference parquet (default: the serving model's)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="report folder")] = None,
    last_n: Annotated[Optional[int], typer.Option("--last-n", help="window: the last N logged images")] = None,
    since: Annotated[Optional[str], typer.Option(help="window: logged since this ISO time")] = None,
) -> None:
    """Evidently drift report of a window of the prediction log vs the reference; exit 3 on drift."""
    from monitoring.drift import run_drift

    serve = load_section("serve")
    cfg = load_section("drift", store=store, reference=reference, out=out, window_last_n=last_n,
                       window_since=since)
    result = run_drift(cfg, model_name=serve.model_name, alias=serve.alias)
    typer.echo(f"no drift: {result.n_drifted}/{result.n_columns} columns drifted "
               f"(share {result.drifted_share:.2f} < {cfg.drift_share}), window {result.window} "
               f"({result.n_current} images); report {cfg.out / 'drift.html'}")


@app.command()
@user_errors
def push(
    store: Annotated[Optional[Path], typer.Option(help="prediction store folder")] = None,
    images: Annotated[Optional[Path], typer.Option(help="folder of <sha256>.png|.jpg when images are not kept")] = None,
    labeling_config: Annotated[Optional[Path], typer.Option("--labeling-config", help="labeling config XML")] = None,
    last_n: Annotated[Optional[int], typer.Option("--last-n", help="window: the last N logged images")] = None,
    drifted: Annotated[bool, typer.Option("--drifted", help="the window drifted: push any image of it")] = False,
    batch: Annotated[Optional[str], typer.Option(help="feedback batch id (default: a timestamp)")] = None,
) -> None:
    """Create Label Studio tasks (with pre-annotations) for images worth labeling from the log."""
    from monitoring.feedback import push as run
    from monitoring.store import open_store

    cfg = load_section("push")
    drift_cfg = load_section("drift", store=store, window_last_n=last_n)
    xml_path = labeling_config or load_section("ingest").labeling_config
    if xml_path is None or not Path(xml_path).is_file():
        raise DetopsError(f"push: labeling config {xml_path} not found (pass --labeling-config)")
    window = open_store(drift_cfg.store).read(last_n=drift_cfg.window_last_n)
    result = run(window, cfg, labeling_config=Path(xml_path).read_text(), drifted=drifted, images=images,
                 batch_id=batch)
    where = f"project {result.project_id}" if result.project_id is not None else str(result.out)
    typer.echo(f"batch {result.batch_id}: {result.created} tasks -> {where} "
               f"({result.selected} selected, {result.skipped_existing} already there)")


@app.command()
@user_errors
def purge(
    store: Annotated[Optional[Path], typer.Option(help="prediction store (default serve.prediction_log)")] = None,
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="retention age: 30d, 12h, 90m")] = None,
    image: Annotated[Optional[str], typer.Option(help="sha256 of one image: delete its records and file")] = None,
) -> None:
    """Delete prediction records by age (retention) or everything about one image hash."""
    from monitoring.store import open_store, parse_age

    if (older_than is None) == (image is None):
        raise DetopsError("purge: give exactly one of --older-than AGE or --image SHA256")
    target = open_store(store or load_section("serve").prediction_log)
    if older_than is not None:
        n = target.purge_older_than(parse_age(older_than))
        typer.echo(f"purged {n} records older than {older_than}")
    else:
        n = target.delete_image(image.strip().lower())
        typer.echo(f"deleted {n} records of image {image}")


if __name__ == "__main__":
    app()
