"""The monitoring loop, closed with evidence (`make loop-demo`, tests/integration/test_feedback_loop.py).

With real components all the way: the base model is registered as `@champion` and served through the
deployment stack (nginx front door, blue/green BentoML colours, deploy/rollout.py) -> shifted traffic
(monitoring/simulate.py) reaches the prediction log -> the drift report flags it -> `push` to a real
Label Studio with pre-annotations -> annotations (the generator's ground truth stands in for
annotators) -> `pull` -> ingest old + new, the held-out part of the feedback batch becoming the target
slice -> validate -> augment -> train (fine-tuned from the champion's weights) -> evaluate with the slice
-> register: the gates pass only if the target slice improved (95% CI lower end >= the margin) and the
base split's 95% CI lower end is >= -`max_map_regression` -> `@champion` moves and the watcher rolls it
out blue/green, or the summary says which gate refused it and with what interval -> the same recipe from
only a few of the labels, judged by the same gates against the same champion (a verdict, not registered)
-> the same kind of traffic again -> drift of the live version's records only (the store filters by
version).

Outputs in `loop.out`: summary.json (keys scripts read), summary.md (the story, with the plots), the
plots, both drift reports and the gate verdict; the work folder holds everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config.monitoring import LoopConfig
from pipelines.errors import DetopsError

USER, PASSWORD, TOKEN = "loop@detops.local", "detops-loop-pass", "detopsloop0123456789abcdef"
TARGET = "feedback"  # the target slice: the held-out part of the feedback batch
PREDICTION_FEATURES = ("n_detections", "mean_confidence", "min_confidence", "max_confidence", "mean_rel_area",
                       "median_rel_area")


def is_prediction_feature(name: str) -> bool:
    """Whether a drift column summarizes the model's outputs (not the image)."""
    return name in PREDICTION_FEATURES or name.startswith("class_share_")


@dataclass
class Base:
    """The starting point: the base project (Label Studio export), its dataset and a trained model."""

    raw: Path
    dataset: Path
    model_dir: Path
    seconds: float = 0.0


@dataclass
class DriftSummary:
    """One drift report, reduced to what the story needs."""

    detected: bool
    drifted_share: float
    prediction_drifted_share: float | None
    # The prediction summaries the report could test: a model that detects nothing on the window leaves
    # its confidence and box-area columns empty, and those are not tested.
    prediction_tested: list[str]
    drifted: list[str]
    calm: list[str]
    window: int
    version: str

    @classmethod
    def of(cls, result: Any, version: str) -> DriftSummary:
        tested = [f for f in result.features]
        prediction = [f for f in tested if is_prediction_feature(f.feature)]
        share = sum(f.drifted for f in prediction) / len(prediction) if prediction else None
        return cls(result.drift_detected, result.drifted_share, share, [f.feature for f in prediction],
                   [f.feature for f in tested if f.drifted],
                   [f.feature for f in tested if not f.drifted], result.n_current, version)


@dataclass
class LoopResult:
    """What the loop did and measured; `summary()` is summary.json."""

    batch_id: str
    pushed: int = 0
    annotated: int = 0
    held_out: int = 0
    trained_on: int = 0
    champion_before: str = ""
    challenger: str = ""
    gates_passed: bool = False
    gate_checks: dict[str, Any] = field(default_factory=dict)
    map50_95: dict[str, dict[str, float | None]] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, DriftSummary] = field(default_factory=dict)
    live_after: str = ""
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)  # Attempt.intervals of the challenger
    few_labels: dict[str, Any] = field(default_factory=dict)  # the few-label challenger (loop.few_labels)
    steps: list[tuple[str, float]] = field(default_factory=list)  # (step, seconds)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "map50_95": self.map50_95, "gates_passed": self.gates_passed, "gates": self.gate_checks,
            "champion_before": self.champion_before, "challenger": self.challenger, "live_after": self.live_after,
            "intervals": self.intervals, "rollout": self.rollout, "few_labels": self.few_labels,
            "drift": {k: {"detected": d.detected, "drifted_share": d.drifted_share,
                          "prediction_drifted_share": d.prediction_drifted_share,
                          "prediction_tested": d.prediction_tested, "drifted": d.drifted,
                          "calm": d.calm, "window": d.window, "model_version": d.version}
                      for k, d in self.drift.items()},
            "labels": {"batch": self.batch_id, "pushed": self.pushed, "annotated": self.annotated,
                       "held_out": self.held_out, "trained_on": self.trained_on},
            "steps_s": {name: round(s, 1) for name, s in self.steps}, "seconds": round(self.seconds, 1),
        }


def prepare_base(cfg: LoopConfig, work: Path, say: Callable[[str], None] = print) -> Base:
    """Synthesize the base project, ingest it and train the base model (`cfg.base_*`)."""
    from labeling.ingest import ingest
    from labeling.synthetic import synthesize
    from pipelines.config.data import IngestConfig, SynthesizeConfig
    from pipelines.config.model import TrainConfig
    from pipelines.environment import configure
    from training.train import train

    configure()
    t0 = time.monotonic()
    raw = synthesize(SynthesizeConfig(out=work / "raw", n_images=cfg.base_images, seed=cfg.seed, classes=cfg.classes,
                                      min_side=cfg.min_side, max_side=cfg.max_side, messy=False))
    ingest(IngestConfig(export=raw / "export.json", labeling_config=raw / "labeling_config.xml", out=work / "ds0"))
    say(f"base: {cfg.base_images} synthetic images, training {cfg.base_epochs} epochs at imgsz {cfg.imgsz}")
    train(TrainConfig(dataset=work / "ds0", out=work / "model0", imgsz=cfg.imgsz, epochs=cfg.base_epochs,
                      batch=cfg.batch, workers=0, experiment=cfg.experiment, runs=work / "runs",
                      report=work / "train0"))
    return Base(raw, work / "ds0", work / "model0", time.monotonic() - t0)


@contextmanager
def _params(cfg: LoopConfig, work: Path) -> Iterator[Path]:
    """A params.yaml for this loop's deployment (free ports, state, prediction log with kept images),
    in effect through DETOPS_PARAMS for the block; the colours inherit it."""
    import yaml

    from pipelines.environment import PROJECT_ROOT
    from pipelines.processes import free_port

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, blue, green = sorted(ports)
    params["serve"].update(model_name=cfg.model_name, workers=1, prediction_log=str(work / "store"),
                           keep_images=True, cache_entries=0)
    params["deploy"].update(port=port, blue_port=blue, green_port=green, state_dir=str(work / "deploy"),
                            reports=str(work / "deploy_reports"), job_workers=0, keep_previous_s=0.0, drain_s=1.0,
                            shadow={"enabled": False}, canary={"enabled": False})
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    # Authentication stays on (docs/access.md): the colours check keys against this loop's job store with
    # a pepper of its own (unless the caller set one), and `simulate` sends a key of tenant loop-demo.
    access = {"DETOPS_PARAMS": str(path),
              "DETOPS_KEY_PEPPER": os.environ.get("DETOPS_KEY_PEPPER") or secrets.token_hex(32),
              "DETOPS_DATABASE_URL": os.environ.get("DETOPS_DATABASE_URL") or f"sqlite:///{work / 'jobs.db'}"}
    saved = {name: os.environ.get(name) for name in (*access, "DETOPS_API_KEY")}
    os.environ.update(access)
    os.environ["DETOPS_API_KEY"] = _loop_key()  # always this loop's own: another key may not be in its store
    try:
        yield path
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _loop_key() -> str:
    """A `detect` key of tenant loop-demo in the job store of DETOPS_DATABASE_URL."""
    from serving.gateway.keys import KeyStore, pepper
    from serving.jobs.store import JobStore

    store = JobStore(os.environ["DETOPS_DATABASE_URL"])
    try:
        store.create_schema()
        return KeyStore(store, pepper()).create("loop-demo", "detect", "loop demo")[1]
    finally:
        store.close()


def _timed(result: LoopResult, name: str, t0: float) -> float:
    now = time.monotonic()
    result.steps.append((name, now - t0))
    return now


def run_loop(cfg: LoopConfig, base: Base, say: Callable[[str], None] = print) -> LoopResult:
    """Every step of the loop from `base` (see the module docstring); writes `cfg.out`. The deployment
    and Label Studio are stopped whatever happens."""
    from deploy.rollout import Deployer
    from pipelines.config.base import load_section
    from pipelines.config.deploy import DeployConfig
    from pipelines.config.serving import ServeConfig
    from pipelines.environment import configure

    configure()
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(work / 'mlflow.db').resolve()}")
    result = LoopResult(batch_id=f"fb-{cfg.shift}-{cfg.seed}")
    t_start = t = time.monotonic()

    with _params(cfg, work):
        deployer = Deployer(load_section(DeployConfig), load_section(ServeConfig))
        try:
            v1, base_eval = _register_base(cfg, base, work)
            result.champion_before = v1
            say(f"1. champion: {cfg.model_name} v{v1}, base test mAP@.5:.95 {base_eval['map50_95']:.3f}")
            t = _timed(result, "register base", t)
            stack = deployer.up()
            say(f"2. deploy up: v{stack.live_version} live on {deployer.front_door} ({stack.live} colour)")
            t = _timed(result, "deploy up", t)
            store = work / "store"
            truth = _traffic(cfg, deployer.front_door, cfg.seed + 5000, store, v1)
            say(f"3. {cfg.traffic} `{cfg.shift}` images through the front door, logged by v{v1}")
            t = _timed(result, "traffic before", t)
            before = _drift(cfg, store, v1, work / "drift_before")
            result.drift["before"] = before
            say(f"4. drift report (v{v1}'s records): {'DRIFT' if before.detected else 'no drift'}, "
                f"{before.drifted_share:.2f} of the columns drifted; prediction summaries "
                f"{_share(before.prediction_drifted_share)} of {len(before.prediction_tested)} tested "
                f"({', '.join(before.drifted) or 'none'})")
            t = _timed(result, "drift before", t)

            pulled = _label(cfg, work, store, v1, truth, result, say)
            t = _timed(result, "label studio", t)

            from deploy.watch import Watcher

            watcher = Watcher(deployer, say=lambda s: say(f"   watcher: {s}"))
            say(f"7. a challenger from all {result.annotated} labels, fine-tuned from "
                f"v{result.champion_before}'s weights:")
            model_all, ds_all, attempt_all = _retrain(cfg, base, work, pulled, "all", result.batch_id, say)
            report = _gate_challenger(cfg, work, model_all, ds_all, work / "slice-all", "all", attempt_all, say)
            result.held_out, result.trained_on = attempt_all.held_out, attempt_all.trained_on
            result.challenger, result.gates_passed = attempt_all.version, attempt_all.gates_passed
            result.gate_checks, result.map50_95 = attempt_all.checks, attempt_all.map50_95
            result.intervals = attempt_all.intervals
            t = _timed(result, "challenger from all labels", t)

            line = watcher.check()
            last = deployer.state.rollouts(1)
            live = deployer.state.stack().live_version
            if report.promoted:
                rollout = last[0] if last else None
                verdict = rollout.verdict if rollout and rollout.version == report.version else "not run"
                result.rollout = {"version": report.version, "verdict": "passed" if verdict == "passed" else "failed",
                                  "detail": line, "colour": rollout.colour if rollout else None}
                say(f"8. watcher: {line}; rollout verdict {verdict}; live v{live}")
            else:
                result.rollout = {"version": None, "verdict": "not run", "detail": line}
                say(f"8. watcher: {line} (the challenger was refused: v{live} stays live)")
            t = _timed(result, "rollout", t)

            if cfg.few_labels:
                # The question this ending answers: would a handful of labels have beaten the champion the
                # whole batch was judged against? The same recipe (the base model's weights, the same
                # held-out slice by the same content-hash rule) from only a few of the labels, judged by the
                # same gates against v1 whichever version is live now; a verdict only, nothing registered.
                held = set(json.loads((work / "slice-all" / "slice.json").read_text())["content_hashes"])
                few = subset_export(pulled, cfg.few_labels, held, work / "pulled-few")
                say(f"9. the same recipe from only {cfg.few_labels} of the labels, judged against "
                    f"v{result.champion_before} like the whole batch (a verdict only, not registered):")
                model_few, ds_few, attempt_few = _retrain(cfg, base, work, few, "few", result.batch_id + "-few", say)
                _gate_challenger(cfg, work, model_few, ds_few, work / "slice-all", "few", attempt_few, say,
                                 against=result.champion_before)
                live = deployer.state.stack().live_version
                result.few_labels = {**asdict(attempt_few), "live_after": live}
                t = _timed(result, "challenger from few labels", t)
            result.live_after = live or ""

            _traffic(cfg, deployer.front_door, cfg.seed + 6000, store, live)
            after = _drift(cfg, store, live, work / "drift_after")
            result.drift["after"] = after
            say(f"10. the same kind of traffic again, v{live}'s records only: "
                f"{'DRIFT' if after.detected else 'no drift'}, {after.drifted_share:.2f} of the columns; "
                f"prediction summaries {_share(before.prediction_drifted_share)} -> "
                f"{_share(after.prediction_drifted_share)} of {len(after.prediction_tested)} tested")
            still = [f for f in after.drifted]
            calmed = [f for f in before.drifted if f not in after.drifted]
            say(f"   still drifting: {', '.join(still) or 'none'}; calmed down: {', '.join(calmed) or 'none'}")
            t = _timed(result, "traffic + drift after", t)
        finally:
            deployer.down()
    result.seconds = time.monotonic() - t_start
    write_summary(cfg, result, work)
    say(f"loop done in {result.seconds:.0f} s; {Path(cfg.out) / 'summary.md'}")
    return result


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _evaluate_cfg(cfg: LoopConfig, model_dir: Path, dataset: Path, out: Path, slices: dict | None = None) -> Any:
    from pipelines.config.model import EvaluateConfig

    return EvaluateConfig(model_dir=model_dir, dataset=dataset, out=out, latency_batch_sizes=[1], latency_repeats=3,
                          smoke_images=4, experiment=cfg.experiment, slices=slices or {})


def loop_gates(cfg: LoopConfig, targets: list[str]) -> Any:
    """The loop's gates: no regression on the base split beyond `max_map_regression` and a CI-backed
    gain on the target slice; the absolute thresholds are the base model's floor only (a tiny CPU model
    is not judged against production latency and calibration targets)."""
    from pipelines.config.model import Gates

    return Gates(min_map50_95=cfg.min_base_map, max_dece_calibrated=1.0, max_latency_ms=10_000.0,
                 max_map_regression=cfg.max_map_regression, bootstrap_samples=cfg.bootstrap_samples, seed=cfg.seed,
                 target_slices=targets, min_target_improvement=cfg.min_target_improvement)


def _register_base(cfg: LoopConfig, base: Base, work: Path) -> tuple[str, dict]:
    """Evaluate the base model and register it; it must become `@champion` (mAP >= min_base_map)."""
    from evaluation.evaluate import evaluate
    from evaluation.register import register
    from pipelines import registry
    from pipelines.config.model import RegisterConfig

    model_dir = Path(shutil.copytree(base.model_dir, work / "champion0", dirs_exist_ok=True))
    evaluate_cfg = _evaluate_cfg(cfg, model_dir, base.dataset, work / "evaluate0")
    metrics = evaluate(evaluate_cfg)
    if metrics["map50_95"] < cfg.min_base_map:
        raise DetopsError(f"loop: the base model's mAP@.5:.95 is {metrics['map50_95']:.3f} < loop.min_base_map "
                          f"{cfg.min_base_map}: train it longer (loop.base_epochs) or on more images")
    report = register(RegisterConfig(model_name=cfg.model_name, model_dir=model_dir, evaluation=work / "evaluate0",
                                     dataset=base.dataset, gates=loop_gates(cfg, [])), evaluate_cfg)
    if not report.promoted:
        raise DetopsError(f"loop: {cfg.model_name} already has a champion (v{report.champion_before}): use a fresh "
                          "registry or another loop.model_name")
    return str(registry.alias_version(cfg.model_name, registry.CHAMPION)), metrics


def _synth(cfg: LoopConfig, n: int, seed: int) -> Any:
    from pipelines.config.data import SynthesizeConfig

    return SynthesizeConfig(n_images=n, seed=seed, classes=cfg.classes, min_side=cfg.min_side,
                            max_side=cfg.max_side, shift=cfg.shift, messy=False)


def _traffic(cfg: LoopConfig, url: str, seed: int, store: Path, version: str | None) -> dict[str, Any]:
    """`cfg.traffic` shifted images POSTed to the front door; waits until the log holds them. Returns
    the generator's ground truth by image sha256 (what annotators would draw)."""
    from labeling.synthetic import jpeg_bytes, render
    from monitoring.simulate import simulate
    from monitoring.store import open_store

    synth = _synth(cfg, cfg.traffic, seed)
    before = len(open_store(store).read(model_version=version)) if (store / "predictions.db").exists() else 0
    sent = simulate(url, cfg.traffic, shift=cfg.shift, rate=cfg.rate, seed=seed, synth=synth, timeout_s=600)
    if sent.status_codes.get("200", 0) != cfg.traffic:
        raise DetopsError(f"loop: traffic got {dict(sent.status_codes)} (expected {cfg.traffic} x 200)")
    deadline = time.monotonic() + 60
    while len(open_store(store).read(model_version=version)) < before + cfg.traffic:
        if time.monotonic() > deadline:  # the logger writes in the background (batches, every 0.5 s)
            raise DetopsError(f"loop: the prediction log did not receive the {cfg.traffic} records of v{version}")
        time.sleep(0.5)
    truth = {}
    for i in range(cfg.traffic):
        sample = render(synth, i)
        truth[hashlib.sha256(jpeg_bytes(sample)).hexdigest()] = sample.truth
    return truth


def _drift(cfg: LoopConfig, store: Path, version: str | None, out: Path) -> DriftSummary:
    """The drift report of `version`'s last `cfg.traffic` records against the champion's reference."""
    from monitoring.drift import compare, read_window, write_outputs
    from monitoring.reference import load_reference
    from pipelines.config.monitoring import DriftConfig

    drift_cfg = DriftConfig(store=store, out=out, window_last_n=cfg.traffic, model_version=version,
                            min_window=cfg.min_window, min_reference=cfg.min_reference, seed=cfg.seed)
    current, window = read_window(drift_cfg)
    reference = load_reference(None, model_name=cfg.model_name, alias="champion")
    result = compare(reference, current, drift_cfg, window=window, html=out / "drift.html")
    write_outputs(result, out)
    return DriftSummary.of(result, str(version))


def _label(cfg: LoopConfig, work: Path, store: Path, version: str, truth: dict[str, Any], result: LoopResult,
           say: Callable[[str], None]) -> Path:
    """Push the drifted window to a real Label Studio, annotate it from the generator's truth, pull it."""
    from unittest import mock

    from label_studio_sdk import LabelStudio

    from labeling.studio import pull
    from labeling.synthetic import labeling_config_xml
    from monitoring import labelstudio_server
    from monitoring.feedback import push
    from monitoring.store import open_store
    from pipelines import processes
    from pipelines.config.monitoring import PushConfig

    labelstudio_server.ensure_installed()
    port = processes.free_port()
    pid = labelstudio_server.start(work / "labelstudio", port, USER, PASSWORD, TOKEN, document_root=store)
    try:
        env = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{port}", "LABEL_STUDIO_API_KEY": TOKEN}
        # What `detops push` and `detops pull` read, for this block only.
        with mock.patch.dict(os.environ, env):
            push_cfg = PushConfig(project_title=f"detops loop {cfg.model_name}", max_per_run=cfg.labels,
                                  max_per_day=max(cfg.labels, 200), state=work / "push_state.json",
                                  document_root=store, out=work / "import.json")
            window = open_store(store).read(last_n=cfg.traffic, model_version=version)
            pushed = push(window, push_cfg, labeling_config=labeling_config_xml(list(cfg.classes)), drifted=True,
                          batch_id=result.batch_id)
            result.pushed = pushed.created
            say(f"5. pushed {pushed.created} of the drifted images to Label Studio (127.0.0.1:{port}) with "
                f"v{version}'s detections as pre-annotations")
            client = LabelStudio(base_url=env["LABEL_STUDIO_URL"], api_key=TOKEN)
            for task in client.tasks.list(project=pushed.project_id, fields="all"):
                gt = truth[task.data["sha256"]]
                regions = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels",
                            "original_width": gt.width, "original_height": gt.height,
                            "value": {"x": 100 * o.box.x1 / gt.width, "y": 100 * o.box.y1 / gt.height,
                                      "width": 100 * o.box.width / gt.width,
                                      "height": 100 * o.box.height / gt.height,
                                      "rotation": 0, "rectanglelabels": [o.label]}}
                           for o in gt.objects if o.in_label_set]
                client.annotations.create(id=task.id, result=regions, was_cancelled=False, ground_truth=False)
                result.annotated += 1
            exported = pull(pushed.project_id, work / "pulled")
            say(f"6. annotated {result.annotated} tasks (the generator's truth stands in for annotators), pulled")
    finally:
        processes.stop(pid)
    return exported


@dataclass
class Attempt:
    """One challenger: what it was trained on and what the gates said."""

    labels: int
    held_out: int
    trained_on: int
    version: str = ""  # its registry version; "" when only judged (the few-label challenger)
    champion: str = ""  # the version it was judged against
    gates_passed: bool = False
    checks: dict[str, Any] = field(default_factory=dict)
    map50_95: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per split, the paired-bootstrap mAP delta against `champion` and its 95% interval.
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    champion_after: str = ""


def subset_export(export: Path, n: int, held_out: set[str], out: Path) -> Path:
    """The batch as if fewer labels had come back: every held-out task of `export` (content hashes
    `held_out`, so the few-label ingest holds out the very same slice) plus the first `n` other tasks
    by id. Written as `out/export.json`, images and labeling config beside."""
    from labeling.studio import resolve_image
    from pipelines.environment import cache_dir

    kept, trainable = [], 0
    for task in sorted(json.loads(export.read_text()), key=lambda t: t["id"]):
        source = resolve_image(task["data"]["image"], export.parent, cache_dir() / "ingest-http")
        if hashlib.sha256(source.read_bytes()).hexdigest() in held_out:
            kept.append(task)
        elif trainable < n:
            kept.append(task)
            trainable += 1
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():
        (out / "images").symlink_to((export.parent / "images").resolve())
    shutil.copy2(export.parent / "labeling_config.xml", out / "labeling_config.xml")
    (out / "export.json").write_text(json.dumps(kept))
    return out / "export.json"


def _retrain(cfg: LoopConfig, base: Base, work: Path, export: Path, name: str, batch_id: str,
             say: Callable[[str], None]) -> tuple[Path, Path, Attempt]:
    """Ingest old + new (a share of the feedback held out as a slice: `work/slice-<name>`), validate,
    augment, fine-tune from the champion's weights; returns (model folder, dataset, attempt)."""
    from labeling.ingest import ingest
    from pipelines.config.data import AugmentConfig, HoldoutConfig, IngestConfig, MinInstances, ValidateConfig
    from pipelines.config.model import TrainConfig
    from pipelines.types import YoloDataset
    from serving.runtime import WEIGHTS_FILE
    from training.augment import augment
    from training.train import train
    from training.validate import validate

    labels = len(json.loads(export.read_text()))
    dataset = work / f"ds-{name}"
    report = ingest(IngestConfig(export=[base.raw / "export.json", export],
                                 labeling_config=base.raw / "labeling_config.xml", out=dataset,
                                 holdout=HoldoutConfig(exports=[export], fraction=cfg.holdout_fraction,
                                                       out=work / f"slice-{name}")))
    held = len(YoloDataset.load(work / f"slice-{name}").images("test"))
    attempt = Attempt(labels=labels, held_out=held, trained_on=labels - held)
    validate(ValidateConfig(dataset=dataset, report=work / f"validate-{name}",
                            min_instances_per_class=MinInstances(train=1, val=0, test=0)))
    augment(AugmentConfig(dataset=dataset, out=work / f"aug-{name}", report=work / f"augment-{name}",
                          copies=cfg.augment_copies))
    say(f"   ingest old + {labels} new labels: {report.images_written} images, {held} feedback images held out, "
        f"{labels - held} to train; validate, augment x{cfg.augment_copies}, fine-tune {cfg.finetune_epochs} "
        f"epochs from the base model's weights")
    train(TrainConfig(dataset=work / f"aug-{name}", out=work / f"model-{name}", imgsz=cfg.imgsz,
                      epochs=cfg.finetune_epochs, lr0=cfg.finetune_lr0, batch=cfg.batch, workers=0,
                      experiment=cfg.experiment, runs=work / "runs", report=work / f"train-{name}",
                      weights=base.model_dir / WEIGHTS_FILE, tags={"detops.feedback_batch": batch_id},
                      # No warm-up: trained weights need no ramp-up, and ultralytics' warm-up starts the
                      # biases at warmup_bias_lr (0.1), far above finetune_lr0 (its effect alone not measured).
                      hyp={"warmup_epochs": 0}))
    return work / f"model-{name}", dataset, attempt


def _gate_challenger(cfg: LoopConfig, work: Path, model_dir: Path, dataset: Path, target: Path, name: str,
                     attempt: Attempt, say: Callable[[str], None], against: str | None = None) -> Any:
    """Evaluate the new model on the base split and the target slice `target`, then the gates: against
    `@champion` through `register` (registered, promoted if they pass), or with `against`, against that
    version with nothing registered or moved (`evaluation.register.judge`). Fills `attempt`."""
    from evaluation.evaluate import evaluate
    from evaluation.register import GATES_FILE, judge, register
    from pipelines.config.model import RegisterConfig

    slices = {TARGET: {"dataset": target, "split": "test"}}
    evaluation = work / f"evaluate-{name}"
    evaluate_cfg = _evaluate_cfg(cfg, model_dir, dataset, evaluation, slices)
    evaluate(evaluate_cfg)
    register_cfg = RegisterConfig(model_name=cfg.model_name, model_dir=model_dir, evaluation=evaluation,
                                  dataset=dataset, gates=loop_gates(cfg, [TARGET]))
    if against is None:
        report = register(register_cfg, evaluate_cfg)
    else:
        report = judge(register_cfg, evaluate_cfg, against)
        report.write(evaluation / GATES_FILE)
    base, sliced = report.comparison, report.slices[TARGET]
    attempt.version, attempt.gates_passed = str(report.version or ""), report.passed
    attempt.champion, attempt.champion_after = str(report.champion_before), str(report.champion_after)
    attempt.checks = {c.name: {"passed": c.passed, "value": c.value, "threshold": c.threshold} for c in report.checks}
    attempt.map50_95 = {"base": {"before": base.champion_map50_95, "after": base.challenger_map50_95},
                        "target": {"before": sliced.champion_map50_95, "after": sliced.challenger_map50_95}}
    attempt.intervals = {split: {"delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high}
                         for split, c in (("base", base), ("target", sliced))}
    say(f"   against v{report.champion_before}: base split mAP@.5:.95 {base.champion_map50_95:.3f} -> "
        f"{base.challenger_map50_95:.3f} (delta {base.delta:+.3f}, CI [{base.ci_low:+.3f}, {base.ci_high:+.3f}], "
        f"lower end must be >= -{cfg.max_map_regression})")
    say(f"   `{TARGET}` slice mAP@.5:.95 {sliced.champion_map50_95:.3f} -> {sliced.challenger_map50_95:.3f} "
        f"(delta {sliced.delta:+.3f}, CI [{sliced.ci_low:+.3f}, {sliced.ci_high:+.3f}], lower end must be >= "
        f"{cfg.min_target_improvement})")
    say(f"   gates {verdict_line(attempt.checks, attempt.champion)}"
        + (f": @champion -> v{report.version}" if report.promoted else ""))
    return report


def verdict_line(checks: dict[str, dict[str, Any]], champion: str) -> str:
    """What the gates decided against `champion` and why: each failed check with the value it read."""
    failed = [f"{name} {c['value']:+.3f} < {c['threshold']:+.3f}" for name, c in checks.items() if not c["passed"]]
    if not failed:
        return f"PASSED against v{champion}"
    return f"REFUSED against v{champion} ({'; '.join(failed)})"


def _interval(c: dict[str, float]) -> str:
    return f"delta {c['delta']:+.3f}, 95% CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def write_summary(cfg: LoopConfig, result: LoopResult, work: Path) -> Path:
    """summary.json, summary.md and the plots in `cfg.out`; the drift reports and gates.json beside."""
    from evaluation.slices import plot_slices

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    plots = []
    if result.map50_95:
        plot_slices({f"champion v{result.champion_before}": {k: v["before"] for k, v in result.map50_95.items()},
                     f"challenger v{result.challenger}": {k: v["after"] for k, v in result.map50_95.items()}},
                    out / "map_slices.png", title="COCO mAP@.5:.95: base test split and target slice")
        plots.append(("mAP per slice, champion vs challenger", "map_slices.png"))
    if result.drift:
        _plot_drift(result, out / "drift_features.png")
        plots.append(("drift per feature, before and after the rollout", "drift_features.png"))
    for name in ("drift_before", "drift_after"):
        if (work / name / "drift.json").exists():
            shutil.copytree(work / name, out / name, dirs_exist_ok=True)
    for name in ("all", "few"):
        if (work / f"evaluate-{name}" / "gates.json").exists():
            shutil.copy2(work / f"evaluate-{name}" / "gates.json", out / f"gates-{name}.json")
    (out / "summary.md").write_text(summary_markdown(cfg, result, plots))
    return out


def _plot_drift(result: LoopResult, path: Path) -> None:
    """One row per drift column: drifted (1) or not (0), before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(n for d in result.drift.values() for n in d.drifted + d.calm))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.5))
    y = np.arange(len(names))
    for k, (label, d) in enumerate(result.drift.items()):
        ax.barh(y + (k - 0.5) * 0.4, [int(n in d.drifted) for n in names], 0.4, label=f"{label} (v{d.version})")
    ax.set_yticks(y, [f"{n} *" if is_prediction_feature(n) else n for n in names], fontsize="small")
    ax.set(xlim=(0, 1.2), xticks=[0, 1], xticklabels=["calm", "drifted"],
           title="Drift per feature (* prediction summary)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_markdown(cfg: LoopConfig, result: LoopResult, plots: list[tuple[str, str]]) -> str:
    """The story, with numbers, for reports/loop/summary.md."""
    m = result.map50_95
    lines = ["# The monitoring loop, closed", "",
             f"Shift `{cfg.shift}`, {cfg.traffic} images per traffic window, {result.pushed} pushed to Label Studio, "
             f"{result.annotated} annotated, {result.held_out} held out as the `{TARGET}` slice, "
             f"{result.trained_on} used for training. Wall time {result.seconds:.0f} s.", "",
             "| | champion (before) | challenger (after) |", "|---|---|---|"]
    for name in ("base", "target"):
        if name in m:
            lines.append(f"| mAP@.5:.95 {name} | {m[name]['before']:.3f} | {m[name]['after']:.3f} "
                         f"({_interval(result.intervals[name])}) |")
    for key in ("before", "after"):
        d = result.drift.get(key)
        if d:
            lines.append(f"| drift {key} (v{d.version}) | {'drift' if d.detected else 'no drift'}, "
                         f"share {d.drifted_share:.2f}, prediction share {_share(d.prediction_drifted_share)} "
                         f"of {len(d.prediction_tested)} tested | |")
    if result.gate_checks:
        ending = (f"promoted: @champion -> v{result.challenger}, rollout {result.rollout.get('verdict')}"
                  if result.gates_passed else
                  f"not promoted: @champion stays v{result.champion_before}, nothing rolled out")
        lines += ["", f"**The challenger from all labels (v{result.challenger}): gates "
                      f"{verdict_line(result.gate_checks, result.champion_before)}; {ending}.** The base split's "
                      f"lower end must be >= -{cfg.max_map_regression}, the `{TARGET}` slice's >= "
                      f"{cfg.min_target_improvement}."]
    if result.few_labels:
        r = result.few_labels
        lines += ["", f"**The same recipe from only {r['trained_on']} training labels, judged against "
                      f"v{r['champion']} like the whole batch: gates {verdict_line(r['checks'], r['champion'])}** "
                      f"(a verdict only, not registered): `{TARGET}` slice {r['map50_95']['target']['before']:.3f} -> "
                      f"{r['map50_95']['target']['after']:.3f} ({_interval(r['intervals']['target'])}), base "
                      f"{r['map50_95']['base']['before']:.3f} -> {r['map50_95']['base']['after']:.3f} "
                      f"({_interval(r['intervals']['base'])}); v{r['live_after']} stayed live."]
    lines += ["", f"Rollout: {json.dumps(result.rollout)}; live after: v{result.live_after}.", ""]
    before, after = result.drift.get("before"), result.drift.get("after")
    if before and after:
        lines += [f"Still drifting after the rollout: {', '.join(after.drifted) or 'none'}.",
                  f"Calmed down: {', '.join(f for f in before.drifted if f not in after.drifted) or 'none'}.",
                  "Image statistics of shifted images drift by nature (the images did not change); the prediction "
                  "summaries (detection count, confidences, class mix, box areas) calm down as far as the model "
                  "answers shifted images like base ones, except what the shift changes in the scene itself (box "
                  f"areas under `scale`). Prediction share {_share(before.prediction_drifted_share)} of "
                  f"{len(before.prediction_tested)} tested -> {_share(after.prediction_drifted_share)} of "
                  f"{len(after.prediction_tested)}.", ""]
    lines += [f"![{title}]({file})" for title, file in plots]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {n} | {s:.0f} |" for n, s in result.steps]
    return "\n".join(lines) + "\n"


def main() -> int:
    """`make loop-demo`: the loop at the sizes of params.yaml's `loop:` section, from a fresh work folder."""
    from pipelines.config.base import load_section

    cfg = load_section(LoopConfig)
    t0 = time.monotonic()
    work = Path(cfg.work)
    if work.exists():
        shutil.rmtree(work)  # a fresh registry and prediction log: the loop's evidence starts from nothing
    work.mkdir(parents=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(work / 'mlflow.db').resolve()}")
    base = prepare_base(cfg, work)
    result = run_loop(cfg, base)
    print(f"total with the base model: {time.monotonic() - t0:.0f} s (base {base.seconds:.0f} s)")
    return 0 if result.gates_passed and result.rollout.get("verdict") == "passed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
