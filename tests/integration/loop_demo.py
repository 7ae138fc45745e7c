"""The feedback loop, end to end with real components (`make loop-demo`; the integration test calls
`run_loop` too): drifted traffic -> prediction log -> `push` to a real Label Studio -> annotations
(the generator's ground truth stands in for annotators) -> `pull` -> ingest (old + new exports) ->
validate -> augment -> train -> evaluate -> register: a challenger version tagged with the batch."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from pipelines import environment, processes
from pipelines.processes import free_port

SIDES = {"min_side": 96, "max_side": 160}
USER, PASSWORD, TOKEN = "loop@detops.local", "detops-loop-pass", "detopsloop0123456789abcdef"


@dataclass
class LoopResult:
    """What the loop produced."""

    batch_id: str
    pushed: int
    annotated: int
    version: str
    tags: dict[str, str]
    seconds: float


def run_loop(work: Path, say: Callable[[str], None] = print, n_shifted: int = 24) -> LoopResult:
    """Run every step in `work`; the Label Studio server is stopped by PID whatever happens."""
    environment.configure()
    from label_studio_sdk import LabelStudio

    from evaluation.evaluate import evaluate
    from evaluation.register import register
    from labeling.ingest import ingest
    from labeling.studio import pull
    from labeling.synthetic import labeling_config_xml, load_ground_truth, synthesize
    from monitoring import labelstudio_server
    from monitoring.feedback import push
    from monitoring.logger import PredictionLogger
    from monitoring.store import open_store
    from pipelines.config.data import (
        AugmentConfig,
        IngestConfig,
        MinInstances,
        SynthesizeConfig,
        ValidateConfig,
    )
    from pipelines.config.model import EvaluateConfig, Gates, RegisterConfig, TrainConfig
    from pipelines.config.monitoring import PushConfig
    from pipelines.images import read_rgb
    from serving.runtime import ModelRuntime
    from training.augment import augment
    from training.train import train
    from training.validate import validate

    t0 = time.monotonic()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    classes = list(SynthesizeConfig().classes)
    say("1. install Label Studio (own venv) if missing")
    labelstudio_server.ensure_installed()

    say("2. base data and a tiny model")
    raw = synthesize(SynthesizeConfig(out=work / "raw", n_images=48, seed=1, **SIDES))
    ingest(IngestConfig(export=raw / "export.json", labeling_config=raw / "labeling_config.xml", out=work / "ds"))
    train(TrainConfig(dataset=work / "ds", out=work / "model", imgsz=64, epochs=2, batch=8, workers=0,
                      experiment="loop", runs=work / "runs", report=work / "report"))

    say(f"3. {n_shifted} dark-shifted images through the model and the prediction logger (images kept)")
    shifted = synthesize(SynthesizeConfig(out=work / "shifted", n_images=n_shifted, seed=21, shift="dark",
                                          messy=False, **SIDES))
    runtime = ModelRuntime.load(work / "model")
    store_dir = work / "store"
    logger = PredictionLogger(store_dir, class_names=runtime.class_names, keep_images=True)
    name_of: dict[str, str] = {}
    for path in sorted((shifted / "images").glob("*.jpg")):
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        name_of[sha] = path.name
        image = read_rgb(path)
        logger.log(image, sha256=sha, request_id=path.name, detections=runtime.predict([image])[0],
                   model_name=runtime.card.name, model_version="loop-base")
    logger.close()

    port = free_port()
    say(f"4. start Label Studio on 127.0.0.1:{port}")
    server_pid = labelstudio_server.start(work / "labelstudio", port, USER, PASSWORD, TOKEN, document_root=store_dir)
    try:
        # What `detops push` and `detops pull` read, for this block only.
        studio_env = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{port}", "LABEL_STUDIO_API_KEY": TOKEN}
        with mock.patch.dict(os.environ, studio_env):
            cfg = PushConfig(project_title="detops loop", max_per_run=n_shifted, state=work / "push_state.json",
                             document_root=store_dir, out=work / "import.json")
            xml = labeling_config_xml(classes)
            window = open_store(store_dir).read()
            say("5. push the drifted window with pre-annotations")
            result = push(window, cfg, labeling_config=xml, drifted=True, batch_id="fb-loop-1")
            again = push(window, cfg, labeling_config=xml, drifted=True)
            if result.created != n_shifted or again.created != 0:
                raise AssertionError(f"push created {result.created}, then {again.created} (expected {n_shifted}, 0)")

            say("6. annotate every task through the SDK with the generator's ground truth")
            client = LabelStudio(base_url=studio_env["LABEL_STUDIO_URL"], api_key=TOKEN)
            truth = load_ground_truth(shifted)
            annotated = 0
            for task in client.tasks.list(project=result.project_id, fields="all"):
                gt = truth[name_of[task.data["sha256"]]]
                regions = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels",
                            "original_width": gt.width, "original_height": gt.height,
                            "value": {"x": 100 * o.box.x1 / gt.width, "y": 100 * o.box.y1 / gt.height,
                                      "width": 100 * o.box.width / gt.width, "height": 100 * o.box.height / gt.height,
                                      "rotation": 0, "rectanglelabels": [o.label]}}
                           for o in gt.objects if o.in_label_set]
                client.annotations.create(id=task.id, result=regions, was_cancelled=False, ground_truth=False)
                annotated += 1

            say("7. pull the export")
            pulled = pull(result.project_id, work / "pulled")
    finally:
        say("   stop Label Studio (by PID)")
        processes.stop(server_pid)

    say("8. ingest old + new exports, validate, augment, train, evaluate, register")
    ingest(IngestConfig(export=[raw / "export.json", pulled], labeling_config=raw / "labeling_config.xml",
                        out=work / "ds2"))
    validate(ValidateConfig(dataset=work / "ds2", report=work / "validate",
                            min_instances_per_class=MinInstances(train=1, val=0, test=0)))
    augment(AugmentConfig(dataset=work / "ds2", out=work / "aug2", report=work / "augment", copies=1))
    train(TrainConfig(dataset=work / "aug2", out=work / "model2", imgsz=64, epochs=2, batch=8, workers=0,
                      experiment="loop", runs=work / "runs", report=work / "report",
                      tags={"detops.feedback_batch": result.batch_id}))
    import mlflow

    evaluate_cfg = EvaluateConfig(model_dir=work / "model2", dataset=work / "ds2", out=work / "evaluate",
                                  latency_repeats=2, latency_batch_sizes=[1])
    evaluate(evaluate_cfg)
    report = register(RegisterConfig(model_name="detops-loop", model_dir=work / "model2",
                                     evaluation=work / "evaluate", dataset=work / "ds2",
                                     gates=Gates(bootstrap_samples=10)), evaluate_cfg)
    version = mlflow.MlflowClient().get_model_version_by_alias("detops-loop", "challenger")
    say(f"9. registered detops-loop v{version.version} @challenger, tags {dict(version.tags)}")
    return LoopResult(result.batch_id, result.created, annotated, str(report.version), dict(version.tags),
                      time.monotonic() - t0)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="detops-loop-") as tmp:
        outcome = run_loop(Path(tmp))
        print(f"loop done in {outcome.seconds:.0f} s: batch {outcome.batch_id}, {outcome.pushed} tasks pushed, "
              f"{outcome.annotated} annotated, challenger v{outcome.version}")
        sys.exit(0 if outcome.tags.get("detops.feedback_batch") == outcome.batch_id else 1)
