"""The Open Inference Protocol (serving/inference_protocol.py) against the real `bentoml serve` of
test_service.py (the shared `server` fixture: no extra server start), with clients nobody here wrote
(tritonclient.http in binary and JSON modes, kserve's InferenceRESTClient: tests/oip_clients.py, run
with the python of their own venv), hand-made binary requests, bad tensors, and Schemathesis over the
protocol's own OpenAPI document (../shared/reference/open-inference-protocol/open_inference_rest.yaml)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.fixtures import images
from tests.integration.conftest import (MAX_BATCH_IMAGES, binary_request, bytes_tensor, detect_rows,
                                       run_oip_clients)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_SPEC = ROOT.parent / "shared" / "reference" / "open-inference-protocol" / "open_inference_rest.yaml"


@pytest.fixture(scope="module")
def model(server: dict) -> dict:
    """The served model's name and version as /detect names them."""
    body = httpx.post(server["url"] + "/detect", content=images.jpeg(64, 48, seed=500),
                      headers={"Content-Type": "image/jpeg"}, timeout=60).json()
    return {"name": body["model"]["name"], "version": body["model"]["version"]}


def v2(server: dict, model: dict, suffix: str = "/infer", *, version: bool = False) -> str:
    base = f"{server['url']}/v2/models/{model['name']}"
    return base + (f"/versions/{model['version']}" if version else "") + suffix


def read_binary_response(resp: httpx.Response) -> dict[str, np.ndarray]:
    length = int(resp.headers["inference-header-content-length"])
    header, offset, out = json.loads(resp.content[:length]), length, {}
    for o in header["outputs"]:
        size = o["parameters"]["binary_data_size"]
        dtype = {"FP32": "<f4", "INT32": "<i4"}[o["datatype"]]
        out[o["name"]] = np.frombuffer(resp.content[offset:offset + size], dtype=dtype).reshape(o["shape"])
        offset += size
    assert offset == len(resp.content)
    return out


def test_tritonclient_and_kserve_get_what_detect_answers(server: dict, model: dict, clients_python: Path,
                                                         tmp_path: Path) -> None:
    uploads = [images.jpeg(160, 120, seed=501), images.png(90, 140, seed=502)]
    paths = []
    for i, data in enumerate(uploads):
        paths.append(tmp_path / f"{i}.img")
        paths[-1].write_bytes(data)
    expected = [detect_rows(server["url"], data, 0.001) for data in uploads]
    assert all(expected), "conf 0.001 on a trained model should keep some boxes"
    report = run_oip_clients(clients_python, server["url"], model["name"], model["version"], paths,
                             "--conf", "0.001")
    triton, kserve = report["triton"], report["kserve"]
    # The same numbers as /detect, bit for bit (FP32), in both encodings and both clients.
    assert triton["binary"] == expected and triton["json"] == expected and kserve["binary"] == expected
    assert triton["live"] and triton["ready"] and triton["model_ready"] and triton["version_ready"]
    assert kserve["live"] and kserve["ready"] and kserve["model_ready"]
    assert triton["json_response"]["model_version"] == model["version"]
    meta = triton["metadata"]
    assert meta["name"] == model["name"] and meta["versions"] == [model["version"]]
    assert json.loads(meta["properties"]["classes"]) == server["classes"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("image", "BYTES"), ("pixels", "FP32")}
    assert {(t["name"], t["datatype"]) for t in meta["outputs"]} == {("detections", "FP32"),
                                                                      ("num_detections", "INT32")}
    assert "binary_tensor_data" in triton["server"]["extensions"]
    assert triton["unknown_version_ready"] is False
    assert triton["unknown_model"]["status"] == "404" and "no-such-model" in triton["unknown_model"]["message"]


def test_binary_requests_go_through_cache_log_and_version_header(server: dict, model: dict) -> None:
    from monitoring.store import open_store

    data = images.jpeg(120, 80, seed=503)
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(data) + 4}}],
              "parameters": {"conf": 0.001, "binary_data_output": True}}
    body, headers = binary_request(header, bytes_tensor([data]))
    first = httpx.post(v2(server, model, version=True), content=body,
                       headers={**headers, "X-Detops-Traffic": "shadow"}, timeout=60)
    assert first.status_code == 200, first.text
    assert first.headers["x-model-version"] == model["version"] and first.headers["x-cache"] == "miss"
    tensors = read_binary_response(first)
    # /detect: a cache hit
    assert tensors["num_detections"].tolist() == [len(detect_rows(server["url"], data, 0.001))]
    again = httpx.post(v2(server, model), content=body, headers=headers, timeout=60)
    assert again.headers["x-cache"] == "hit" and again.content == first.content
    sha = hashlib.sha256(data).hexdigest()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the logger writes in the background
        frame = open_store(server["log_dir"]).read(traffic=None)
        if sha in set(frame["image_sha256"]) and len(frame[frame["image_sha256"] == sha]) >= 3:
            break
        time.sleep(0.5)
    assert set(frame[frame["image_sha256"] == sha]["traffic"]) == {"shadow", "live"}


def test_a_preprocessed_fp32_tensor_is_served_like_its_8_bit_image(server: dict, model: dict) -> None:
    from serving.runtime import letterbox

    rgb = np.asarray(Image.open(io.BytesIO(images.jpeg(200, 130, seed=504))).convert("RGB"))
    boxed, _ = letterbox(rgb, server["imgsz"])
    png = io.BytesIO()
    Image.fromarray(boxed).save(png, "PNG")
    tensor = (boxed.transpose(2, 0, 1)[None].astype(np.float32) / 255).astype("<f4")
    header = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(tensor.shape),
                          "parameters": {"binary_data_size": tensor.nbytes}}],
              "parameters": {"conf": 0.001},
              "outputs": [{"name": "num_detections", "parameters": {"binary_data": False}},
                          {"name": "detections", "parameters": {"binary_data": True}}]}
    body, headers = binary_request(header, tensor.tobytes())
    resp = httpx.post(v2(server, model), content=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    outputs = json.loads(resp.content[:length])["outputs"]
    assert [o["name"] for o in outputs] == ["num_detections", "detections"] and "data" in outputs[0]
    rows = np.frombuffer(resp.content[length:], "<f4").reshape(outputs[1]["shape"])[0].tolist()
    assert rows == detect_rows(server["url"], png.getvalue(), 0.001) and outputs[0]["data"] == [len(rows)]
    # The same tensor as JSON (nested lists are allowed by the protocol).
    as_json = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(tensor.shape),
                           "data": tensor.tolist()}], "parameters": {"conf": 0.001}}
    resp = httpx.post(v2(server, model), json=as_json, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    detections = next(o for o in resp.json()["outputs"] if o["name"] == "detections")
    assert np.asarray(detections["data"], np.float32).reshape(detections["shape"])[0].tolist() == rows


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


JPEG = images.jpeg(60, 40, seed=505)
OK_INPUT = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(JPEG)]}
BAD: dict[str, tuple[object, int]] = {
    "not_json": (b"{not json", 400),
    "no_inputs": ({"outputs": [{"name": "detections"}]}, 400),
    "two_inputs": ({"inputs": [OK_INPUT, OK_INPUT]}, 400),
    "unknown_input": ({"inputs": [{**OK_INPUT, "name": "images"}]}, 400),
    "wrong_datatype": ({"inputs": [{**OK_INPUT, "datatype": "FP32"}]}, 400),
    "count_vs_shape": ({"inputs": [{**OK_INPUT, "shape": [2]}]}, 400),
    "bad_base64": ({"inputs": [{**OK_INPUT, "data": ["%%%"]}]}, 400),
    "not_an_image": ({"inputs": [{**OK_INPUT, "data": [_b64(images.TEXT)]}]}, 415),
    "truncated_image": ({"inputs": [{**OK_INPUT, "data": [_b64(images.truncated_jpeg())]}]}, 422),
    "too_many_images": ({"inputs": [{**OK_INPUT, "shape": [MAX_BATCH_IMAGES + 1],
                                     "data": [_b64(JPEG)] * (MAX_BATCH_IMAGES + 1)}]}, 413),
    "pixels_wrong_shape": ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                        "data": [0.5] * 192}]}, 400),
    "unknown_parameter": ({"inputs": [OK_INPUT], "parameters": {"confidence": 0.5}}, 400),
    "parameter_type": ({"inputs": [OK_INPUT], "parameters": {"max_det": "ten"}}, 400),
    "parameter_range": ({"inputs": [OK_INPUT], "parameters": {"conf": 2.0}}, 422),
    "unknown_output": ({"inputs": [OK_INPUT], "outputs": [{"name": "boxes"}]}, 400),
    "binary_size_mismatch": ("binary_size_mismatch", 400),
    "header_length_garbage": ("header_length_garbage", 400),
    "unknown_model": ("unknown_model", 404),
    "unknown_version": ("unknown_version", 404),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors_answer_a_protocol_error_4xx(server: dict, model: dict, case: str) -> None:
    payload, status = BAD[case]
    url, headers, content = v2(server, model), {"Content-Type": "application/json"}, None
    if case == "binary_size_mismatch":
        content, headers = binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                       "parameters": {"binary_data_size": 999}}]},
                                          bytes_tensor([JPEG]))
    elif case == "header_length_garbage":
        content, headers = json.dumps({"inputs": [OK_INPUT]}).encode(), {"Inference-Header-Content-Length": "x"}
    elif case in ("unknown_model", "unknown_version"):
        url = v2(server, {"name": "no-such-model", "version": "1"}) if case == "unknown_model" else \
            v2(server, {**model, "version": "no-such-version"}, version=True)
        content = json.dumps({"inputs": [OK_INPUT]}).encode()
    else:
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    resp = httpx.post(url, content=content, headers=headers, timeout=60)
    assert resp.status_code == status, resp.text
    assert isinstance(resp.json()["error"], str) and resp.json()["error"], resp.text
    assert httpx.get(server["url"] + "/v2/health/ready", timeout=30).status_code == 200


def test_schemathesis_over_the_protocols_own_openapi(server: dict, model: dict, tmp_path: Path) -> None:
    """The protocol's OpenAPI document (its `${NAME}` path templates made plain `{NAME}`: the `$` is
    not OpenAPI templating), every operation in it (all are implemented); half the generated cases
    name the served model and version and carry a real image (tests/integration/schemathesis_oip_hooks.py)."""
    spec = yaml.safe_load(PROTOCOL_SPEC.read_text())
    spec["paths"] = {re.sub(r"\$\{(\w+)\}", r"{\1}", path): item for path, item in spec["paths"].items()}
    assert len(spec["paths"]) == 6
    schema = tmp_path / "open_inference_rest.json"
    schema.write_text(json.dumps(spec))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", str(schema), "--url", server["url"],
         "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", "10", "--seed", "1",
         "--phases", "examples,fuzzing", "--generation-database", "none", "--max-time", "25"],
        cwd=ROOT, env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_oip_hooks",
                       "DETOPS_OIP_MODEL": model["name"], "DETOPS_OIP_VERSION": model["version"]},
        capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    print(out[-4000:])
    assert done.returncode == 0, out[-6000:]
    tested = re.search(r"Tested:\s+(\d+)", out)
    assert tested and int(tested.group(1)) == 6, out[-3000:]
