"""`detops register`, `promote`, `rollback` and `mlflow-ui`: the MLflow model registry side of the lifecycle.

Every `register` logs the evaluated model folder as a pyfunc model (evaluation/pyfunc_model.py) into its
training run and registers it as a NEW version of `register.model_name`, then:

- alias `challenger` -> the new version, always;
- the gates (evaluation/gates.py) decide: all pass -> alias `champion` -> the new version, the version
  it replaced kept in the new champion's tag `previous_champion`; any fail -> `champion` stays put.
  A failed gate is a result, not an error: `register` exits 0, prints "not promoted" in red and
  writes the verdict to gates.json.

`promote VERSION` moves `champion` by hand (recording the previous champion the same way), `rollback`
moves it back to the current champion's `previous_champion`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from evaluation.gates import ChampionComparison, GateReport, check_gates, gates_table, load_metrics
from pipelines.config import EvaluateConfig, RegisterConfig
from pipelines.errors import DetopsError

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_TAG = "previous_champion"
GATES_FILE = "gates.json"
COPIED_RUN_TAGS = ("dataset_hash", "dataset_hash_source", "git_sha", "git_dirty")
RUN_TAG_PREFIX = "detops."  # e.g. detops.feedback_batch, set by the monitoring loop on the training run
# The modules the pyfunc model needs at load time, shipped with it as code (package layout kept).
PYFUNC_CODE = ("pipelines/__init__.py", "pipelines/errors.py", "pipelines/images.py", "pipelines/types.py",
               "serving/__init__.py", "serving/calibrator.py", "serving/runtime.py",
               "evaluation/__init__.py", "evaluation/pyfunc_model.py")
PYFUNC_REQUIREMENTS = ("mlflow", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "opencv-python-headless",
                       "onnxruntime")


def client() -> Any:
    """An MlflowClient on the project's tracking store."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def alias_version(mlflow_client: Any, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the registered model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig) -> GateReport:
    """Gate the evaluated model in `cfg.model_dir`, register it as a new version and move the aliases.

    `evaluate_cfg` gives the prediction thresholds the champion is re-evaluated with, the same ones
    the challenger's evaluation used."""
    from rich.console import Console

    from serving.runtime import CARD_FILE, MODEL_FILE, ModelCard

    card = ModelCard.load(cfg.model_dir / CARD_FILE)
    if not card.run_id:
        raise DetopsError(f"{cfg.model_dir / CARD_FILE}: no run_id (train the model with `detops train`)")
    if not (cfg.model_dir / MODEL_FILE).is_file():
        raise DetopsError(f"{cfg.model_dir}: no {MODEL_FILE} (train the model with `detops train`)")
    metrics = load_metrics(cfg.evaluation / "metrics.json")
    mlflow_client = client()
    run = _training_run(mlflow_client, card.run_id)
    name = cfg.model_name

    champion = alias_version(mlflow_client, name, CHAMPION)
    comparison = None
    notes = []
    if champion is None:
        notes.append(f"no version of {name} is {CHAMPION} yet: the regression check passes")
    else:
        comparison = compare_with_champion(cfg, evaluate_cfg, champion, metrics["map50_95"])
    report = GateReport(name, check_gates(metrics, cfg.gates, comparison), champion_before=champion,
                        champion_after=champion, comparison=comparison, notes=notes)

    version = _log_and_register(cfg, card, card.run_id)
    report.version = version
    _tag_version(mlflow_client, name, version, report, run, cfg.evaluation / "metrics.json")
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
    if report.passed:
        set_champion(mlflow_client, name, version, reason="gates")
        report.champion_after = version
    report.write(cfg.evaluation / GATES_FILE)

    console = Console()
    console.print(gates_table(report))
    if report.promoted:
        console.print(f"[green]{name} v{version} registered and promoted: @{CHAMPION} -> v{version}[/green]")
    else:
        console.print(f"[red]{name} v{version} registered as @{CHALLENGER}, not promoted: "
                      f"@{CHAMPION} stays at {_v(champion)}[/red]")
    return report


def compare_with_champion(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig, champion: str,
                          challenger_map: float) -> ChampionComparison:
    """The champion version predicted by the shared runtime on the test split of `cfg.dataset` (the
    one the challenger was evaluated on), and the paired-bootstrap mAP delta challenger - champion."""
    from evaluation.coco import bootstrap_map_delta, coco_detections, coco_ground_truth, coco_metrics
    from evaluation.evaluate import predict_split
    from pipelines.types import YoloDataset

    dataset = YoloDataset.load(cfg.dataset)
    gt = coco_ground_truth(dataset, "test")
    challenger_gt = _read_json(cfg.evaluation / "coco_gt.json")
    if _image_keys(challenger_gt) != _image_keys(gt):
        raise DetopsError(f"{cfg.evaluation / 'coco_gt.json'}: the challenger was evaluated on other images "
                          f"than the test split of {cfg.dataset} (re-run `detops evaluate`)")
    challenger_dt = _read_json(cfg.evaluation / "coco_dt.json")
    runtime = _champion_runtime(cfg.model_name, champion)
    predictions = predict_split(runtime, dataset, "test", gt, evaluate_cfg)
    champion_dt = coco_detections(predictions, gt)
    delta, lo, hi = bootstrap_map_delta(gt, champion_dt, challenger_dt, n=cfg.gates.bootstrap_samples,
                                        seed=cfg.gates.seed)
    return ChampionComparison(champion_version=champion, champion_map50_95=coco_metrics(gt, champion_dt).map50_95,
                              challenger_map50_95=challenger_map, delta=delta, ci_low=lo, ci_high=hi,
                              bootstrap_samples=cfg.gates.bootstrap_samples)


def _champion_runtime(name: str, version: str) -> Any:
    """The champion's model folder from the registry, opened uncalibrated: mAP ranks by raw scores,
    as the challenger's coco_dt.json does."""
    import mlflow

    from evaluation.pyfunc_model import MODEL_DIR_ARTIFACT
    from serving.runtime import ModelRuntime

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    model_dir = local / "artifacts" / MODEL_DIR_ARTIFACT
    if not model_dir.is_dir():
        raise DetopsError(f"models:/{name}/{version}: not a detops pyfunc model (no artifacts/{MODEL_DIR_ARTIFACT})")
    return ModelRuntime.load(model_dir, calibrated=False)


def _log_and_register(cfg: RegisterConfig, card: Any, run_id: str) -> str:
    """Log the pyfunc model into the training run and register it; the new version number."""
    import mlflow
    import pandas as pd

    from evaluation.pyfunc_model import MODEL_DIR_ARTIFACT, DetectorPyfunc, signature
    from pipelines.environment import PROJECT_ROOT
    from pipelines.tracking import resume_run
    from pipelines.types import YoloDataset
    from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE

    calibrator = cfg.model_dir / CALIBRATOR_FILE
    if not calibrator.is_file():
        raise DetopsError(f"{calibrator}: not found (run `detops evaluate`, which fits it)")
    examples = YoloDataset.load(cfg.dataset).images("test")
    if not examples:
        raise DetopsError(f"{cfg.dataset}: no test images (needed for the input example)")
    with tempfile.TemporaryDirectory(prefix="detops-register-") as tmp:
        staging = Path(tmp)
        model_dir = staging / MODEL_DIR_ARTIFACT
        model_dir.mkdir()
        for file in (MODEL_FILE, CARD_FILE, CALIBRATOR_FILE):
            shutil.copy2(cfg.model_dir / file, model_dir / file)
        code = staging / "code"
        for rel in PYFUNC_CODE:
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / rel, code / rel)
        with resume_run(run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=DetectorPyfunc(), artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                code_paths=[str(p) for p in sorted(code.iterdir())], signature=signature(card),
                input_example=pd.DataFrame({"image": [examples[0].read_bytes()]}),
                pip_requirements=_pinned_requirements(), registered_model_name=cfg.model_name)
    if info.registered_model_version is None:
        raise DetopsError(f"MLflow did not register a version of {cfg.model_name}")
    return str(info.registered_model_version)


def _tag_version(mlflow_client: Any, name: str, version: str, report: GateReport, run: Any,
                 metrics_path: Path) -> None:
    """Gate results, evaluation metrics, provenance and the run's `detops.*` tags on the version."""
    tags = {"gates.passed": str(report.passed).lower(), "run_id": run.info.run_id}
    for check in report.checks:
        tags[f"gate.{check.name}"] = "pass" if check.passed else "fail"
        tags[f"gate.{check.name}.value"] = "none" if check.value is None else f"{check.value:.6g}"
        tags[f"gate.{check.name}.threshold"] = f"{check.comparison} {check.threshold:.6g}"
    if report.comparison:
        c = report.comparison
        tags["gate.no_regression.ci95"] = f"[{c.ci_low:.6g}, {c.ci_high:.6g}]"
        tags["gate.no_regression.champion"] = c.champion_version
    for key, value in _read_json(metrics_path).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"metric.{key}"] = f"{value:.6g}"
    for key, value in run.data.tags.items():
        if key in COPIED_RUN_TAGS or key.startswith(RUN_TAG_PREFIX):
            tags[key] = value
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)


def set_champion(mlflow_client: Any, name: str, version: str, *, reason: str) -> str | None:
    """Point `champion` at `version`, recording the champion it replaces in the version's tag
    `previous_champion`; returns that previous champion (None when there was none)."""
    previous = alias_version(mlflow_client, name, CHAMPION)
    if previous == version:
        return previous
    if previous is None:
        if PREVIOUS_TAG in mlflow_client.get_model_version(name, version).tags:
            mlflow_client.delete_model_version_tag(name, version, PREVIOUS_TAG)
    else:
        mlflow_client.set_model_version_tag(name, version, PREVIOUS_TAG, previous)
    mlflow_client.set_model_version_tag(name, version, "promoted_by", reason)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return previous


def promote(name: str, version: str) -> str | None:
    """`detops promote VERSION`: make an existing version the champion, whatever its gates said."""
    mlflow_client = client()
    _existing_version(mlflow_client, name, version)
    previous = set_champion(mlflow_client, name, str(version), reason="manual")
    print(f"{name}: @{CHAMPION} -> v{version} (was {_v(previous)})")
    return previous


def rollback(name: str) -> str:
    """`detops rollback`: point `champion` back at the current champion's previous champion."""
    mlflow_client = client()
    current = alias_version(mlflow_client, name, CHAMPION)
    if current is None:
        raise DetopsError(f"{name}: no {CHAMPION} to roll back")
    previous = mlflow_client.get_model_version(name, current).tags.get(PREVIOUS_TAG)
    if not previous:
        raise DetopsError(f"{name}: v{current} has no previous champion recorded: nothing to roll back to")
    _existing_version(mlflow_client, name, previous)
    # The previous champion keeps its own `previous_champion` tag, so a second rollback goes further back.
    mlflow_client.set_registered_model_alias(name, CHAMPION, previous)
    mlflow_client.set_model_version_tag(name, current, "rolled_back", "true")
    print(f"{name}: @{CHAMPION} -> v{previous} (rolled back from v{current})")
    return previous


def mlflow_ui_command(host: str, port: int) -> list[str]:
    """The `mlflow ui` command line on the project's tracking store, artifacts served from beside it."""
    from pipelines.tracking import artifact_location, tracking_uri

    uri = tracking_uri()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", host, "--port", str(port)]
    artifacts = artifact_location(uri)
    if artifacts:  # new experiments created from the UI then keep their artifacts beside the database
        command += ["--artifacts-destination", artifacts]
    return command


def mlflow_ui(host: str, port: int) -> int:
    """Run the MLflow UI in the foreground until interrupted; its exit code."""
    command = mlflow_ui_command(host, port)
    print(f"MLflow UI on http://{host}:{port} (store {command[command.index('--backend-store-uri') + 1]})")
    return subprocess.call(command)


def _existing_version(mlflow_client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not str(version).isdigit():
        raise DetopsError(f"{name}: version must be a number (got {version!r})")
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise DetopsError(f"{name}: no version {version} in the registry") from None


def _training_run(mlflow_client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import tracking_uri

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        raise DetopsError(f"training run {run_id} (model_card.json) is not in the tracking store "
                          f"{tracking_uri()}") from None


def _pinned_requirements() -> list[str]:
    """The pyfunc's pip requirements pinned to what is installed (MLflow's inference would import the
    model in a subprocess, slow, to find the same list)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DetopsError(f"{path}: not found (run `detops evaluate` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DetopsError(f"{path}: not valid JSON ({exc})") from None


def _image_keys(gt: dict) -> list[tuple]:
    return sorted((im["file_name"], im["width"], im["height"]) for im in gt.get("images", []))


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
