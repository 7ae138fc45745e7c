"""The evaluate stage end to end on a really trained tiny model (plumbing: its mAP is near zero)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from evaluation.coco import coco_metrics
from pipelines.config.model import EvaluateConfig
from pipelines.errors import DetopsError
from pipelines.types import YoloDataset
from serving.calibrator import Calibrator
from serving.runtime import ModelRuntime

pytestmark = pytest.mark.integration


@pytest.fixture()
def model_dir(trained_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy: the stage writes calibrator.json into the model folder."""
    return Path(shutil.copytree(trained_model_dir, tmp_path / "model"))


def _cfg(model_dir: Path, dataset: Path, out: Path, **kw) -> EvaluateConfig:
    return EvaluateConfig(model_dir=model_dir, dataset=dataset, out=out, latency_batch_sizes=[1, 4],
                          latency_repeats=2, **kw)


def test_evaluate_writes_reports_calibrator_and_logs_to_the_training_run(model_dir: Path, yolo_dataset: Path,
                                                                         mlflow_uri: str, tmp_path: Path):
    import mlflow

    from evaluation.evaluate import evaluate

    out = tmp_path / "report"
    with warnings.catch_warnings():
        # A 2-epoch model may find nothing correct on val: the stage then ships the identity calibrator.
        warnings.filterwarnings("ignore", message="cannot fit")
        metrics = evaluate(_cfg(model_dir, yolo_dataset, out))

    for name in ("metrics.json", "coco_gt.json", "coco_dt.json", "pr_curves.png", "pr_curve.csv",
                 "reliability.png", "reliability.csv", "confusion_matrix.png", "confusion.csv"):
        assert (out / name).stat().st_size > 0, name
    written = json.loads((out / "metrics.json").read_text())
    for key in ("map50_95", "map50", "map75", "ar100", "dece", "dece_calibrated", "ece", "ece_calibrated"):
        assert 0.0 <= written[key] <= 1.0, key
    assert written["latency_ms_batch1"] > 0 and written["best_batch"] in (1, 4)
    assert written["latency_ms_per_image_best_batch"] > 0
    assert written["latency_ms_served_single"] > 0
    card = ModelRuntime.load(model_dir).card
    assert set(written["per_class"]) == set(card.classes)
    assert set(written["size"]) == {"small", "medium", "large"}

    gt = json.loads((out / "coco_gt.json").read_text())
    dt = json.loads((out / "coco_dt.json").read_text())
    assert written["n_test_images"] == len(gt["images"]) > 0
    # One entry per detection the artifact returns at the evaluation thresholds.
    runtime = ModelRuntime.load(model_dir, calibrated=False)
    from pipelines.images import read_rgb

    first = sorted((yolo_dataset / "images" / "test").iterdir())[0]
    n_first = len(runtime.predict([read_rgb(first)], conf=0.001, iou=0.7, max_det=300)[0])
    first_id = next(i["id"] for i in gt["images"] if i["file_name"] == first.name)
    assert sum(d["image_id"] == first_id for d in dt) == n_first
    assert len(dt) == written["n_test_detections"]
    assert coco_metrics(gt, dt).map50_95 == pytest.approx(written["map50_95"])

    # The calibrator ships with the model and the runtime picks it up.
    calibrator = Calibrator.load(model_dir / "calibrator.json")
    assert (model_dir / "calibrator.json").exists()
    assert calibrator.method == written["calibration"]["method"]
    assert ModelRuntime.load(model_dir).calibrator == calibrator

    run = mlflow.MlflowClient(mlflow_uri).get_run(card.run_id)
    assert run.data.metrics["test_map50_95"] == pytest.approx(written["map50_95"])
    assert "test_dece_calibrated" in run.data.metrics
    assert metrics["mlflow_run_id"] == card.run_id
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_uri).list_artifacts(card.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/calibrator.json", "evaluation/reference.parquet"} <= artifacts


def test_missing_training_run_logs_to_a_new_run_with_a_warning(model_dir: Path, yolo_dataset: Path,
                                                               mlflow_uri: str, tmp_path: Path):
    from evaluation.evaluate import evaluate

    card_path = model_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["run_id"] = "0" * 32
    card_path.write_text(json.dumps(card))
    with pytest.warns(UserWarning, match="not in"):
        metrics = evaluate(_cfg(model_dir, yolo_dataset, tmp_path / "report", calibration_method="none",
                                experiment="evaluate-orphans"))
    assert metrics["mlflow_run_id"] != card["run_id"]
    assert metrics["calibration"]["method"] == "identity"


def test_class_mismatch_is_refused(model_dir: Path, yolo_dataset: Path, tmp_path: Path):
    from evaluation.evaluate import evaluate

    card_path = model_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["classes"] = list(reversed(card["classes"]))
    card_path.write_text(json.dumps(card))
    with pytest.raises(DetopsError, match="model classes"):
        evaluate(_cfg(model_dir, yolo_dataset, tmp_path / "report"))


def test_the_served_path_latency_decodes_uploads_as_the_service_does(model_dir: Path, yolo_dataset: Path) -> None:
    """serving/latency.py runs the service's steps on encoded uploads: a valid image file is timed, a
    truncated one is refused by the service's own decoder (RequestRejected), never timed as fast."""
    from serving.imaging import RequestRejected
    from serving.latency import single_request_ms

    image = next(iter(YoloDataset.load(yolo_dataset).images("test")))
    limits = {"max_upload_bytes": 1 << 24, "max_pixels": 1 << 24}
    assert single_request_ms(model_dir, [image.read_bytes()], threads=1, repeats=3, **limits) > 0
    with pytest.raises(RequestRejected):
        single_request_ms(model_dir, [image.read_bytes()[:200]], threads=1, repeats=3, **limits)
