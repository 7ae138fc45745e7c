"""Fixtures shared by integration modules: the served Detector of test_service.py, reused by
test_service_oip.py (the Open Inference Protocol against the same `bentoml serve`, started once); the
python of the Open Inference Protocol clients' venv and the protocol's request helpers, used by
test_service_oip.py and test_deploy.py (the clients through nginx)."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serving_process import detector_service

MAX_UPLOAD = 600_000  # above the largest real photo (543 kB), small enough for the 413 tests' bodies
MAX_BATCH_IMAGES = 4
SERVE_IMGSZ = 320
ROOT = Path(__file__).resolve().parents[2]
CLIENTS_VENV = ROOT / ".venv-oip-clients"


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


@pytest.fixture(scope="session")
def clients_python() -> Path:
    """The python of the Open Inference Protocol clients' venv (`make test` creates it; created here
    too when missing)."""
    marker = CLIENTS_VENV / ".installed"
    if not marker.exists():
        subprocess.run(["make", str(marker.relative_to(ROOT))], cwd=ROOT, check=True, timeout=900)
    return CLIENTS_VENV / "bin" / "python"


def run_oip_clients(python: Path, url: str, model: str, version: str, images: list[Path],
                    *options: str) -> dict:
    """tests/oip_clients.py (tritonclient, kserve) against `url` with the clients' `python`; its report."""
    done = subprocess.run([str(python), str(ROOT / "tests" / "oip_clients.py"), url, model, version,
                           *map(str, images), *options], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def detect_rows(url: str, data: bytes, conf: float,
                headers: dict[str, str] | None = None) -> list[list[float]]:
    """/detect's answer for `data` as rows (x1, y1, x2, y2, confidence, class_id), float32 like the
    tensors; the image's format is read from its bytes."""
    resp = httpx.post(url + "/detect", content=data, params={"conf": conf},
                      headers={"Content-Type": "image/jpeg", **(headers or {})}, timeout=60)
    assert resp.status_code == 200, resp.text
    rows = [[d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"], d["confidence"],
             d["class_id"]] for d in resp.json()["detections"]]
    return np.asarray(rows, dtype=np.float32).reshape(-1, 6).tolist()


def binary_request(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    """An inference request with the binary tensor data extension: its body and headers."""
    text = json.dumps(header).encode()
    return text + b"".join(chunks), {"Inference-Header-Content-Length": str(len(text)),
                                     "Content-Type": "application/octet-stream"}


def bytes_tensor(items: list[bytes]) -> bytes:
    """A BYTES tensor's binary form: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)
