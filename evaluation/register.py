"""`detops register`: gate the evaluated model and add it to the MLflow model registry.

Every `register` logs the evaluated model folder as a pyfunc model (evaluation/pyfunc_model.py) into its
training run and registers it as a NEW version of `register.model_name`, then:

- alias `challenger` -> the new version, always;
- the gates (evaluation/gates.py) decide: all pass -> alias `champion` -> the new version (through
  `pipelines.registry.set_champion`, which records the version it replaced); any fail -> `champion`
  stays put. A failed gate is a result, not an error: `register` exits 0, prints "not promoted" in red
  and writes the verdict to gates.json.

The version carries few tags (the gate verdict, provenance, the run's `detops.*` tags) and a short
Markdown description with the gate table and the evaluation figures, which the MLflow UI shows on the
version's page; every metric stays on the training run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from evaluation.gates import ChampionComparison, GateReport, check_gates, gates_table, load_metrics
from evaluation.quantize import choose_variant, describe_variant
from pipelines import registry
from pipelines.config.model import EvaluateConfig, QuantizeConfig, RegisterConfig
from pipelines.errors import DetopsError
from pipelines.registry import CHALLENGER, CHAMPION

GATES_FILE = "gates.json"
COMPARISON_PLOT = "slices_vs_champion.png"
COPIED_RUN_TAGS = ("dataset_hash", "git_sha")
RUN_TAG_PREFIX = "detops."  # e.g. detops.feedback_batch, set by the monitoring loop on the training run
PYFUNC_MODULE = "evaluation.pyfunc_model"  # shipped with the code it imports (pipelines.imports)
PYFUNC_REQUIREMENTS = ("mlflow", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "opencv-python-headless",
                       "onnxruntime")


def register(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig, quantize_cfg: QuantizeConfig | None = None) -> GateReport:
    """Gate the evaluated model in `cfg.model_dir`, register it as a new version and move the aliases.

    `evaluate_cfg` gives the prediction thresholds the champion is re-evaluated with, the same ones
    the challenger's evaluation used. With `quantize_cfg`, the variant gate (evaluation/quantize.py)
    first decides whether the fp32 model or its int8 copy is the challenger."""
    from rich.console import Console

    from serving.runtime import CARD_FILE, MODEL_FILE, ModelCard

    decision, gates_dir = None, cfg.evaluation  # gates.json stays with the fp32 evaluation (DVC metrics)
    if quantize_cfg is not None:
        decision = choose_variant(quantize_cfg, cfg.model_dir, cfg.evaluation, cfg.gates.max_dece_calibrated,
                                  cfg.gates.bootstrap_samples, cfg.gates.seed)
        Console().print(f"variant: [bold]{decision.chosen}[/bold] ({decision.reason})")
        cfg = cfg.model_copy(update={"model_dir": Path(decision.model_dir), "evaluation": Path(decision.evaluation)})

    card = ModelCard.load(cfg.model_dir / CARD_FILE)
    if not card.run_id:
        raise DetopsError(f"{cfg.model_dir / CARD_FILE}: no run_id (train the model with `detops train`)")
    if not (cfg.model_dir / MODEL_FILE).is_file():
        raise DetopsError(f"{cfg.model_dir}: no {MODEL_FILE} (train the model with `detops train`)")
    mlflow_client = registry.client()
    run = _training_run(mlflow_client, card.run_id)
    name = cfg.model_name

    champion = registry.alias_version(name, CHAMPION, mlflow_client)
    report = judge(cfg, evaluate_cfg, champion)
    if decision is not None:
        report.notes.append(f"variant {decision.chosen}: {decision.reason}")
        report.variant = decision.to_dict()

    version = _log_and_register(cfg, card, card.run_id)
    report.version = version
    _describe_version(mlflow_client, name, version, report, run, _read_json(cfg.evaluation / "metrics.json"))
    if decision is not None:
        describe_variant(mlflow_client, name, version, decision)
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
    if report.passed:
        registry.set_champion(name, version, reason="gates", mlflow_client=mlflow_client)
        report.champion_after = version
    report.write(gates_dir / GATES_FILE)
    if report.comparison is not None and report.slices:
        _plot_against_champion(report, gates_dir / COMPARISON_PLOT)

    console = Console()
    console.print(gates_table(report))
    if report.promoted:
        console.print(f"[green]{name} v{version} registered and promoted: @{CHAMPION} -> v{version}[/green]")
    else:
        console.print(f"[red]{name} v{version} registered as @{CHALLENGER}, not promoted: "
                      f"@{CHAMPION} stays at {_v(champion)}[/red]")
    return report


def judge(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig, champion: str | None) -> GateReport:
    """The gates on the evaluated model of `cfg` against version `champion` of `cfg.model_name` (None: no
    champion yet), registering nothing: what `register` acts on, and how the monitoring loop judges a
    challenger against a version that is no longer `@champion`."""
    metrics = load_metrics(cfg.evaluation / "metrics.json")
    comparison = None
    slices: dict[str, ChampionComparison] = {}
    notes = []
    _check_target_slices(cfg, evaluate_cfg)
    if champion is None:
        notes.append(f"no version of {cfg.model_name} is {CHAMPION} yet: the regression check passes")
    else:
        champion_runtime = _champion_runtime(cfg.model_name, champion)
        comparison = compare_with_champion(cfg, evaluate_cfg, champion, metrics["map50_95"], champion_runtime)
        slices = compare_slices_with_champion(cfg, evaluate_cfg, champion, champion_runtime)
    return GateReport(cfg.model_name, check_gates(metrics, cfg.gates, comparison, slices), champion_before=champion,
                      champion_after=champion, comparison=comparison, notes=notes, slices=slices)


def compare_with_champion(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig, champion: str,
                          challenger_map: float, runtime: Any = None) -> ChampionComparison:
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
    runtime = runtime or _champion_runtime(cfg.model_name, champion)
    predictions = predict_split(runtime, dataset, "test", gt, evaluate_cfg)
    champion_dt = coco_detections(predictions, gt)
    delta, lo, hi = bootstrap_map_delta(gt, champion_dt, challenger_dt, n=cfg.gates.bootstrap_samples,
                                        seed=cfg.gates.seed)
    return ChampionComparison(champion_version=champion, champion_map50_95=coco_metrics(gt, champion_dt).map50_95,
                              challenger_map50_95=challenger_map, delta=delta, ci_low=lo, ci_high=hi,
                              bootstrap_samples=cfg.gates.bootstrap_samples)


def compare_slices_with_champion(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig, champion: str,
                                  runtime: Any) -> dict[str, ChampionComparison]:
    """Per slice of `evaluate_cfg.slices`: the champion predicted on the slice the challenger was
    evaluated on (its coco_gt.json must match), and the paired-bootstrap mAP delta."""
    from evaluation.coco import bootstrap_map_delta, coco_metrics
    from evaluation.slices import predict_slice, read_slice_coco

    out = {}
    for name, spec in evaluate_cfg.slices.items():
        challenger_gt, challenger_dt = read_slice_coco(cfg.evaluation, name)
        gt, champion_dt = predict_slice(runtime, name, spec, evaluate_cfg)
        if _image_keys(challenger_gt) != _image_keys(gt):
            raise DetopsError(f"{cfg.evaluation}: slice {name!r} was evaluated on other images than {spec.dataset} "
                              f"holds now (re-run `detops evaluate`)")
        delta, lo, hi = bootstrap_map_delta(gt, champion_dt, challenger_dt, n=cfg.gates.bootstrap_samples,
                                            seed=cfg.gates.seed)
        out[name] = ChampionComparison(champion_version=champion,
                                       champion_map50_95=coco_metrics(gt, champion_dt).map50_95,
                                       challenger_map50_95=coco_metrics(gt, challenger_dt).map50_95, delta=delta,
                                       ci_low=lo, ci_high=hi, bootstrap_samples=cfg.gates.bootstrap_samples)
    return out


def _plot_against_champion(report: GateReport, path: Path) -> None:
    """Champion and challenger side by side on the base split and every slice."""
    from evaluation.slices import plot_slices
    from pipelines.config.model import BASE_SLICE

    pairs = {BASE_SLICE: report.comparison, **report.slices}
    champion = report.comparison.champion_version
    plot_slices({f"champion v{champion}": {n: c.champion_map50_95 for n, c in pairs.items()},
                 f"challenger v{report.version}": {n: c.challenger_map50_95 for n, c in pairs.items()}},
                path, title="COCO mAP@.5:.95, champion vs challenger")


def _check_target_slices(cfg: RegisterConfig, evaluate_cfg: EvaluateConfig) -> None:
    """Every target slice must be an evaluated slice: a typo must not pass the gate silently."""
    unknown = [s for s in cfg.gates.target_slices if s not in evaluate_cfg.slices]
    if unknown:
        raise DetopsError(f"register.gates.target_slices {unknown} are not in evaluate.slices "
                          f"({sorted(evaluate_cfg.slices) or 'none'})")


def _champion_runtime(name: str, version: str) -> Any:
    """The champion's model folder from the registry, opened uncalibrated: mAP ranks by raw scores,
    as the challenger's coco_dt.json does."""
    from serving.runtime import ModelRuntime

    dest = Path(tempfile.mkdtemp(prefix="detops-champion-"))  # the session keeps the ONNX file open
    return ModelRuntime.load(registry.download_model_dir(name, version, dest), calibrated=False)


def _log_and_register(cfg: RegisterConfig, card: Any, run_id: str) -> str:
    """Log the pyfunc model into the training run and register it; the new version number."""
    import mlflow
    import pandas as pd

    from evaluation.pyfunc_model import DetectorPyfunc, signature
    from pipelines.environment import PROJECT_ROOT
    from pipelines.imports import project_files
    from pipelines.registry import MODEL_DIR_ARTIFACT, PYFUNC_NAME, SMOKE_DIR, SMOKE_FILE
    from pipelines.tracking import resume_run
    from pipelines.types import YoloDataset
    from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE

    calibrator = cfg.model_dir / CALIBRATOR_FILE
    if not calibrator.is_file():
        raise DetopsError(f"{calibrator}: not found (run `detops evaluate`, which fits it)")
    smoke = cfg.evaluation / SMOKE_DIR
    if not (smoke / SMOKE_FILE).is_file():
        raise DetopsError(f"{smoke / SMOKE_FILE}: not found (run `detops evaluate`, which writes it)")
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
        for rel in project_files(PYFUNC_MODULE):
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / rel, code / rel)
        with resume_run(run_id):
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_NAME, python_model=DetectorPyfunc(),
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir), SMOKE_DIR: str(smoke)},
                code_paths=[str(p) for p in sorted(code.iterdir())], signature=signature(card),
                input_example=pd.DataFrame({"image": [examples[0].read_bytes()]}),
                pip_requirements=_pinned_requirements(), registered_model_name=cfg.model_name)
    if info.registered_model_version is None:
        raise DetopsError(f"MLflow did not register a version of {cfg.model_name}")
    return str(info.registered_model_version)


def _describe_version(mlflow_client: Any, name: str, version: str, report: GateReport, run: Any,
                      metrics: dict[str, Any]) -> None:
    """Few tags (the gate verdict, provenance, the run's `detops.*` tags) and a Markdown description
    with the gate table and the headline evaluation figures; the metrics themselves stay on the run."""
    tags = {"gates.passed": str(report.passed).lower(), "run_id": run.info.run_id}
    tags |= {k: v for k, v in run.data.tags.items() if k in COPIED_RUN_TAGS or k.startswith(RUN_TAG_PREFIX)}
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    mlflow_client.update_model_version(name, version, description=version_description(report, metrics))


def version_description(report: GateReport, metrics: dict[str, Any]) -> str:
    """What the MLflow UI shows on a version's page: the verdict, the gate table, the figures."""
    verdict = "all gates passed" if report.passed else "gates failed: not promoted by the gates"
    lines = [f"**{verdict}**", "", "| gate | value | threshold | result |", "|---|---|---|---|"]
    for c in report.checks:
        value = "-" if c.value is None else f"{c.value:.4g}"
        result = "pass" if c.passed else "FAIL"
        lines.append(f"| {c.name} | {value} | {c.comparison} {c.threshold:.4g} | {result} |")
    if report.comparison:
        c = report.comparison
        lines += ["", (f"mAP@.5:.95 vs champion v{c.champion_version}: {c.champion_map50_95:.4f} -> "
                       f"{c.challenger_map50_95:.4f} (delta {c.delta:+.4f}, "
                       f"95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}])")]
    for name, c in report.slices.items():
        lines.append(f"slice {name}: {c.champion_map50_95:.4f} -> {c.challenger_map50_95:.4f} "
                     f"(delta {c.delta:+.4f}, 95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}])")
    figures = [("mAP@.5:.95", "map50_95"), ("mAP@.5", "map50"), ("D-ECE raw", "dece"),
               ("D-ECE calibrated", "dece_calibrated"), ("latency ms (1 image)", "latency_ms_batch1"),
               ("test images", "n_test_images")]
    shown = [f"{label} {metrics[key]:.4g}" for label, key in figures if isinstance(metrics.get(key), (int, float))]
    lines += ["", "Test split: " + ", ".join(shown) + ". Every metric is on the training run."]
    return "\n".join(lines)


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
