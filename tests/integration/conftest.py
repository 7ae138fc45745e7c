"""Fixtures shared by integration modules: the served Detector of test_service.py, reused by
test_service_oip.py (the Open Inference Protocol against the same `bentoml serve`, started once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving_process import detector_service

MAX_UPLOAD = 300_000
MAX_BATCH_IMAGES = 4
SERVE_IMGSZ = 320


@pytest.fixture(scope="session")
def server(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running service; yields its base URL, prediction-log folder and class names. One worker:
    the cache and the batch-size histogram are per worker, and these tests read them. Session-scoped
    so that test_service.py and test_service_oip.py (which runs after it) share one server."""
    import shutil

    from ultralytics import YOLO

    from serving.runtime import CARD_FILE, MODEL_FILE, WEIGHTS_FILE, ModelCard
    from training.train import export_onnx

    tmp = tmp_path_factory.mktemp("serve")
    # The session's weights exported at a larger input size: at imgsz 64 one inference takes well under
    # a millisecond, less than the gap between two requests' arrivals, so no batch could ever form.
    model_dir = Path(shutil.copytree(trained_model_dir, tmp / "model"))
    export_onnx(YOLO(str(model_dir / WEIGHTS_FILE)), SERVE_IMGSZ, model_dir / MODEL_FILE)
    card = ModelCard.load(model_dir / CARD_FILE).model_copy(update={"imgsz": SERVE_IMGSZ})
    card.save(model_dir / CARD_FILE)
    overrides = {"DETOPS_SERVE_WORKERS": "1", "DETOPS_SERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                 "DETOPS_SERVE_MAX_BATCH_IMAGES": str(MAX_BATCH_IMAGES), "DETOPS_SERVE_MAX_LATENCY_MS": "5000",
                 "DETOPS_SERVE_CACHE_ENTRIES": "64", "DETOPS_SERVE_THREADS": "1"}
    with detector_service(model_dir, tmp, overrides=overrides) as running:
        yield {"url": running.url, "log_dir": tmp / "predictions", "classes": card.classes, "serve_log": running.log,
               "model_dir": model_dir, "imgsz": SERVE_IMGSZ}
