"""The BentoML service for real: the session's tiny trained model imported with `detops build
--model-dir` into a private BENTOML_HOME, `bentoml serve serving.service:Detector` as a subprocess on
a free loopback port, then every endpoint over HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures import images
from tests.integration.conftest import MAX_BATCH_IMAGES, MAX_UPLOAD

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# The `server` fixture (tests/integration/conftest.py) is shared with test_service_oip.py: one `bentoml serve`.


def post(server: dict, route: str, files: list | dict, data: dict | None = None) -> httpx.Response:
    return httpx.post(server["url"] + route, files=files, data=data, timeout=60)


def check_detect_body(body: dict, width: int, height: int, classes: list[str]) -> None:
    assert body["image"]["width"] == width and body["image"]["height"] == height
    assert re.fullmatch(r"[0-9a-f]{64}", body["image"]["sha256"])
    assert body["model"]["version"].startswith("local:") and body["model"]["name"]
    for det in body["detections"]:
        box = det["box"]
        assert 0 <= box["x1"] <= box["x2"] <= width and 0 <= box["y1"] <= box["y2"] <= height
        assert det["class_name"] == classes[det["class_id"]]
        assert 0 <= det["confidence"] <= 1 and 0 <= det["raw_confidence"] <= 1


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_detect_contract_and_cache(server: dict) -> None:
    data = images.jpeg(160, 120, seed=3)
    first = post(server, "/detect", {"image": ("x.jpg", data, "image/jpeg")}, {"conf": "0.001"})
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "miss"
    body = first.json()
    check_detect_body(body, 160, 120, server["classes"])
    assert body["detections"], "conf 0.001 on a trained model should keep some boxes"
    again = post(server, "/detect", {"image": ("other-name.png", data, "application/octet-stream")}, {"conf": "0.001"})
    assert again.headers["x-cache"] == "hit" and again.json() == body
    changed = post(server, "/detect", {"image": ("x.jpg", data)}, {"conf": "0.002"})
    assert changed.headers["x-cache"] == "miss"
    assert all(d["confidence"] > 0.002 for d in changed.json()["detections"])
    limited = post(server, "/detect", {"image": ("x.jpg", data)}, {"conf": "0.001", "max_det": "1", "classes": "[0]"})
    assert len(limited.json()["detections"]) <= 1
    assert all(d["class_id"] == 0 for d in limited.json()["detections"])


def test_raw_body_is_answered_like_multipart(server: dict) -> None:
    # The image as the request body (no multipart, no temp file), options in the query string.
    data = images.png(140, 90, seed=91)
    multipart = post(server, "/detect", {"image": ("x.png", data)}, {"conf": "0.001", "max_det": "7"})
    raw = httpx.post(server["url"] + "/detect", content=data, params={"conf": "0.001", "max_det": "7"},
                     headers={"Content-Type": "image/png"}, timeout=60)
    assert multipart.status_code == raw.status_code == 200, raw.text
    assert raw.json() == multipart.json() and raw.headers["x-cache"] == "hit"  # same bytes, same key
    other = images.jpeg(120, 100, seed=92)
    fresh = httpx.post(server["url"] + "/detect", content=other, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert fresh.status_code == 200 and fresh.headers["x-cache"] == "miss"
    check_detect_body(fresh.json(), 120, 100, server["classes"])
    rendered = httpx.post(server["url"] + "/render", content=other, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert rendered.status_code == 200 and rendered.content[:2] == b"\xff\xd8"


@pytest.mark.parametrize("case", ["not_an_image", "empty", "unknown_param", "bad_param", "too_large", "batch"])
def test_raw_body_bad_input_is_a_json_4xx(server: dict, case: str) -> None:
    url, body, params, status = server["url"] + "/detect", images.jpeg(40, 40, seed=93), {}, 422
    if case == "not_an_image":
        body, status = b"certainly not a JPEG", 415
    elif case == "empty":
        body, status = b"", 400
    elif case == "unknown_param":
        params, status = {"confidence": "0.5"}, 400
    elif case == "bad_param":
        params, status = {"conf": "2"}, 400
    elif case == "too_large":
        body, status = b"\xff" * (MAX_UPLOAD + 1), 413
    else:  # several images need multipart
        url, status = server["url"] + "/detect_batch", 400
    resp = httpx.post(url, content=body, params=params, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] and resp.json()["detail"]
    assert httpx.get(server["url"] + "/readyz", timeout=30).status_code == 200


def test_a_cache_hit_is_logged_with_the_features_of_its_image(server: dict) -> None:
    # A hit is answered without decoding; its log record still carries the image's own features.
    from monitoring.logger import make_record
    from monitoring.store import open_store
    from pipelines.images import read_rgb

    data = images.jpeg(130, 70, seed=94)
    answers = [httpx.post(server["url"] + "/detect", content=data, headers={"Content-Type": "image/jpeg"},
                          timeout=60) for _ in range(3)]
    assert [a.headers["x-cache"] for a in answers] == ["miss", "hit", "hit"]
    sha = answers[0].json()["image"]["sha256"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        frame = open_store(server["log_dir"]).read(traffic=None)
        rows = frame[frame["image_sha256"] == sha]
        if len(rows) == 3:
            break
        time.sleep(0.5)
    assert len(rows) == 3
    expected = make_record(read_rgb(data), sha256=sha, request_id="x", detections=[], class_names=server["classes"],
                           model_name="m", model_version="v")
    for _, row in rows.iterrows():
        assert {k: row[k] for k in expected.statistics} == expected.statistics
        assert [row[f"emb_{i}"] for i in range(len(expected.embedding))] == expected.embedding.tolist()


def test_detect_over_http_is_exactly_what_the_runtime_predicts(server: dict) -> None:
    """What is evaluated is what is served, at the last step: the bytes of /detect's JSON against
    `ModelRuntime.predict` (which evaluate, the registry's pyfunc and monitoring run) on the same
    images and parameters, one worker thread on both sides."""
    from pipelines.images import read_rgb
    from serving.runtime import ModelRuntime

    runtime = ModelRuntime.load(server["model_dir"], threads=1)
    cases = [(images.jpeg(160, 120, seed=41), {}), (images.png(97, 203, seed=42), {"conf": 0.001}),
             (images.exif_rotated_jpeg(80, 40), {"conf": 0.001, "iou": 0.3, "max_det": 5}),
             (images.jpeg(300, 64, seed=43), {"conf": 0.001, "classes": [1, 0]})]
    compared = 0
    for data, params in cases:
        form = {k: json.dumps(v) for k, v in params.items()}
        served = post(server, "/detect", {"image": ("x", data)}, form).json()["detections"]
        expected = runtime.predict([read_rgb(data)], **params)[0]
        assert [(d["class_id"], d["box"], d["confidence"], d["raw_confidence"]) for d in served] == [
            (d.class_id, {"x1": d.box.x1, "y1": d.box.y1, "x2": d.box.x2, "y2": d.box.y2}, d.confidence,
             d.raw_confidence) for d in expected]
        compared += len(expected)
    assert compared > 0


def test_detect_batch_keeps_order_and_count(server: dict) -> None:
    sizes = [(64, 48), (100, 80), (90, 120)]
    files = [("images", (f"{i}.png", images.png(w, h, seed=i))) for i, (w, h) in enumerate(sizes)]
    resp = post(server, "/detect_batch", files)
    assert resp.status_code == 200, resp.text
    bodies = resp.json()
    assert len(bodies) == 3
    for body, (w, h) in zip(bodies, sizes):
        check_detect_body(body, w, h, server["classes"])
    assert resp.headers["x-cache"] == "miss,miss,miss"
    too_many = [("images", (f"{i}.png", images.png(8, 8, seed=i))) for i in range(MAX_BATCH_IMAGES + 1)]
    refused = post(server, "/detect_batch", too_many)
    assert refused.status_code == 413, refused.text[:500]
    assert refused.json()["error"] == "too_many_images" and str(MAX_BATCH_IMAGES) in refused.json()["detail"]


def test_render_returns_a_jpeg_of_the_image_size(server: dict) -> None:
    resp = post(server, "/render", {"image": ("x.png", images.png(120, 90, seed=5))}, {"conf": "0.001"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(resp.content)) as im:
        assert (im.format, im.size) == ("JPEG", (120, 90))
        drawn = np.asarray(im.convert("RGB"), dtype=np.int16)
    original = images.noise(120, 90, seed=5).astype(np.int16)
    assert np.abs(drawn - original).mean() > 1  # boxes were drawn over the noise, not just re-encoded


def test_openapi_lists_the_endpoints(server: dict) -> None:
    spec = httpx.get(server["url"] + "/docs.json").json()
    for path in ("/detect", "/detect_batch", "/render", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/results"):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/jobs"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert set(spec["paths"]["/jobs/{job_id}"]) == {"get", "delete"}
    assert not [p for p in spec["paths"] if "detect_async" in p]  # the non-durable task endpoint is gone
    assert httpx.get(server["url"] + "/").status_code == 200
    assert httpx.get(server["url"] + "/livez").status_code == 200


BURST = 32  # concurrent single-image requests: the tiny model is fast, so many must overlap


def test_concurrent_requests_form_batches(server: dict) -> None:
    # BentoML's dispatcher first learns its latency model from about a dozen calls run one at a time:
    # get past that phase, whatever ran before this test.
    for i in range(16):
        assert post(server, "/detect", {"image": ("w.png", images.png(40 + i, 40, seed=300 + i))}).status_code == 200
    before = httpx.get(server["url"] + "/metrics").text
    uploads = [images.png(64 + i, 48, seed=100 + i) for i in range(BURST)]
    with cf.ThreadPoolExecutor(BURST) as pool:
        codes = list(pool.map(lambda b: post(server, "/detect", {"image": ("x.png", b)}).status_code, uploads))
    assert codes == [200] * BURST
    after = httpx.get(server["url"] + "/metrics").text
    name = "detops_inference_batch_size"  # observed once per ONNX Runtime call of the in-process batcher
    calls = metric(after, name + "_count") - metric(before, name + "_count")
    images_run = metric(after, name + "_sum") - metric(before, name + "_sum")
    assert images_run == BURST
    assert calls < BURST, f"{BURST} concurrent requests ran in {calls:.0f} batches: no batching happened"
    assert metric(after, "detops_detections_per_image_count") >= BURST
    assert metric(after, "detops_cache_requests_total", result="miss") >= BURST
    assert metric(after, "detops_model_info") == 1


BAD = {
    "truncated_jpeg": (lambda: {"image": ("t.jpg", images.truncated_jpeg())}, 422, "corrupt_image"),
    "zero_bytes": (lambda: {"image": ("z.jpg", b"")}, 400, "empty_file"),
    "plain_text": (lambda: {"image": ("t.jpg", images.TEXT)}, 415, "not_an_image"),
    "bomb_header": (lambda: {"image": ("b.png", images.png_header_only(50_000, 50_000))}, 422, "too_many_pixels"),
    "oversized": (lambda: {"image": ("big.png", b"\x89PNG" + os.urandom(MAX_UPLOAD + 10))}, 413, "file_too_large"),
    "way_oversized": (lambda: {"image": ("big.png", os.urandom(MAX_UPLOAD + 200_000))}, 413, "file_too_large"),
    "missing_field": (lambda: {"conf": (None, "0.5")}, 400, "missing_field"),  # multipart without the file
    "misnamed_field": (lambda: {"file": ("x.jpg", images.jpeg())}, 400, "missing_field"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_json_4xx_and_the_service_stays_up(server: dict, case: str) -> None:
    files, status, code = BAD[case]
    resp = post(server, "/detect", files())
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]
    if case in ("missing_field", "misnamed_field"):
        assert "image" in body["detail"]
    assert httpx.get(server["url"] + "/readyz").status_code == 200


def test_bad_parameters_are_named(server: dict) -> None:
    resp = post(server, "/detect", {"image": ("x.jpg", images.jpeg())}, {"conf": "2"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_parameter" and "conf" in resp.json()["detail"]
    resp = post(server, "/detect", {"image": ("x.jpg", images.jpeg())}, {"classes": "[99]"})
    assert resp.status_code == 422 and resp.json()["error"] == "unknown_class" and "99" in resp.json()["detail"]
    resp = post(server, "/detect", {"image": (None, "http://127.0.0.1:1/x.jpg")})  # never fetched
    assert resp.status_code == 400 and "image: expected an uploaded file" in resp.json()["detail"]
    # A raw body is accepted as an image (Content-Type image/...) only; anything else must be multipart.
    resp = httpx.post(server["url"] + "/detect", content=b"raw bytes", headers={"content-type": "text/plain"})
    assert resp.status_code == 400 and "multipart/form-data" in resp.json()["detail"]
    assert httpx.post(server["url"] + "/internal/infer", json={"batch": [[0]]}).status_code == 404  # no tensor route


def _exif_rotated() -> tuple[bytes, int, int]:
    return images.exif_rotated_jpeg(80, 40), 40, 80


ODD = {
    "one_pixel": lambda: (images.one_pixel_png(), 1, 1),
    "animated_gif": lambda: (images.animated_gif(40, 30), 40, 30),
    "cmyk_jpeg": lambda: (images.cmyk_jpeg(50, 40), 50, 40),
    "png16": lambda: (images.png16(32, 24)[0], 32, 24),
    "rgba_png": lambda: (images.rgba_png(30, 20), 30, 20),
    "exif_rotated": _exif_rotated,
}


@pytest.mark.parametrize("case", list(ODD))
def test_odd_but_valid_images_are_served(server: dict, case: str) -> None:
    data, width, height = ODD[case]()
    resp = post(server, "/detect", {"image": ("f", data)}, {"conf": "0.001"})
    assert resp.status_code == 200, resp.text
    check_detect_body(resp.json(), width, height, server["classes"])
    assert httpx.get(server["url"] + "/readyz").status_code == 200


def test_predictions_are_logged_with_their_traffic(server: dict) -> None:
    from monitoring.store import open_store

    live = post(server, "/detect", {"image": ("x.jpg", images.jpeg(50, 50, seed=77))}).json()["image"]["sha256"]
    # What the deployment's front door marks as shadow traffic is logged apart from live traffic.
    shadowed = httpx.post(server["url"] + "/detect", files={"image": ("s.jpg", images.jpeg(52, 52, seed=78))},
                          headers={"X-Detops-Traffic": "shadow"}, timeout=60).json()["image"]["sha256"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the logger writes in the background: wait for both records
        frame = open_store(server["log_dir"]).read(traffic=None)
        if {live, shadowed} <= set(frame["image_sha256"]):
            break
        time.sleep(0.5)
    assert frame["image_sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    traffic = frame.groupby("image_sha256")["traffic"].agg(set)
    assert traffic[live] == {"live"} and traffic[shadowed] == {"shadow"}
    logged_live = set(open_store(server["log_dir"]).read()["image_sha256"])  # what drift and push read
    assert live in logged_live and shadowed not in logged_live


def test_every_response_names_the_model_version(server: dict) -> None:
    ok = post(server, "/detect", {"image": ("x.jpg", images.jpeg(40, 40, seed=79))})
    bad = post(server, "/detect", {"image": ("t.jpg", images.TEXT)})
    probe = httpx.get(server["url"] + "/readyz")
    assert ok.headers["x-model-version"] == ok.json()["model"]["version"]
    assert bad.status_code == 415 and probe.status_code == 200
    assert bad.headers["x-model-version"] == probe.headers["x-model-version"] == ok.headers["x-model-version"]


def test_request_metrics_are_labelled_by_route_not_by_path(server: dict) -> None:
    """A job id or a scanned URL in the path is no new series of BentoML's request metrics (each was
    kept for a worker's life: the soak's RSS growth); deploy/k8s's queries still find /detect."""
    ids = [os.urandom(8).hex() for _ in range(3)]
    for job_id in ids:
        httpx.get(f"{server['url']}/jobs/{job_id}/results")
        httpx.get(f"{server['url']}/scan-{job_id}")
    assert post(server, "/detect", {"image": ("m.png", images.png(30, 30, seed=5))}).status_code == 200
    series = [line for line in httpx.get(server["url"] + "/metrics").text.splitlines()
              if line.startswith("bentoml_service_request_total{")]
    endpoints = {re.search(r'endpoint="([^"]*)"', line).group(1) for line in series}
    assert {"/detect", "/jobs/{job_id}/results", "unmatched"} <= endpoints, endpoints
    assert not any(job_id in line for line in series for job_id in ids)


def test_the_kubernetes_manifests_use_metrics_and_probe_routes_this_service_has(server: dict) -> None:
    """deploy/k8s's analyses and alerts query the service's own series (read here from /metrics after
    one request), with the labels they filter on; its probes answer, saying which version serves."""
    from tests.unit.test_k8s import rendered

    assert post(server, "/detect", {"image": ("k.png", images.png(50, 40, seed=11))}).status_code == 200
    text = httpx.get(server["url"] + "/metrics").text
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    objects = rendered("production")
    queries = [m["provider"]["prometheus"]["query"] for o in objects if o["kind"] == "AnalysisTemplate"
               for m in o["spec"]["metrics"] if "prometheus" in m["provider"]]
    queries += [r["expr"] for o in objects if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"]
                for r in g["rules"]]
    used = {n for q in queries for n in re.findall(r"\b(?:bentoml|detops)_[a-z0-9_]+", q)}
    from_service = {n for n in used if not n.startswith(("detops_drift_", "detops_jobs_"))}  # pushed / exported
    assert {"bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket"} <= from_service
    assert from_service <= exposed, from_service - exposed
    assert re.search(r'bentoml_service_request_total\{[^}]*endpoint="/detect"[^}]*http_response_code="200"', text)
    rollout = next(o for o in objects if o["kind"] == "Rollout")
    container = rollout["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        answer = httpx.get(server["url"] + container[probe]["httpGet"]["path"])
        assert answer.status_code == 200 and answer.headers.get("X-Model-Version"), (probe, answer.headers)
