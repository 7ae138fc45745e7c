"""The Open Inference Protocol (KServe V2 / Triton HTTP/REST) beside detops' own API, so that Triton,
KServe, Seldon and MLServer clients (`tritonclient.http`, kserve's `InferenceRESTClient`,
`perf_analyzer`) work unchanged. A Starlette app mounted on the BentoML service (serving/service.py):
every route goes through the same gateway (keys, scopes, tenants, limits, circuit breaker) and request
guard (`X-Model-Version`, traffic kind) as `/detect`, and inference goes through the very same path as
`/detect` (`Detector._predict`: cache, adaptive batching, breaker, prediction log), so the numbers are
the same for the same image.

Routes (`{name}` is the served registry model's name, the `model.name` of a /detect answer;
`{version}`, optional, its registry version, the `X-Model-Version` header):

- `GET /v2`: server metadata (extension `binary_tensor_data`); `GET /v2/health/live`, `/v2/health/ready`
  (public, like /livez and /readyz: not ready while the circuit is open);
- `GET /v2/models/{name}[/versions/{version}]`: model metadata (inputs, outputs; `properties.classes`
  holds the class names as a JSON list, indexed by class id); `.../ready`;
- `POST /v2/models/{name}[/versions/{version}]/infer`.

Inputs (exactly one per request):
- `image`, BYTES `[B]`: one encoded image (JPEG, PNG, ...) per element; raw bytes with the binary tensor
  data extension, base64 strings in a JSON body (JSON tensors carry UTF-8 text only);
- `pixels`, FP32 `[B, 3, S, S]`: images already letterboxed to the model's square input (RGB, scaled to
  [0, 1]) by a client that preprocesses itself. Each is rounded to 8 bits (lossless for pixels that came
  from an 8-bit image) and served like an uploaded S x S image, so its boxes are in input pixels.
Parameters (request `parameters`): `conf`, `iou`, `max_det` as for /detect; `binary_data_output`.
Outputs:
- `detections`, FP32 `[B, D, 6]`: per image, its detections as rows (x1, y1, x2, y2, confidence,
  class_id), boxes in image pixels, best first, D the largest count in the request; rows past
  `num_detections[i]` are zeros;
- `num_detections`, INT32 `[B]`.
Errors: `{"error": "<code>: <what is wrong>"}` with a 4xx (bad tensors, unknown model or version: 404) or
a 5xx (inference failed, overloaded, circuit open); the gateway's own refusals (401, 403, 429) carry
detops' `{"error": code, "detail": ...}`, also a protocol error object.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import gateway, metrics
from serving.gateway.breaker import OPEN
from serving.imaging import RequestRejected

log = logging.getLogger(__name__)

EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "inference-header-content-length"
IMAGE_INPUT, PIXELS_INPUT = "image", "pixels"
DETECTIONS_OUTPUT, COUNT_OUTPUT = "detections", "num_detections"
PARAMETERS = ("conf", "iou", "max_det", "binary_data_output")
JSON_FLOAT_BYTES = 12  # room for one FP32 value as JSON text, in the body limit
_DTYPES = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4")}


def _service() -> Any:
    """This worker's Detector instance (set by BentoML once the worker has created it)."""
    import bentoml

    return bentoml.get_current_service()


def _error(status: int, code: str, detail: str, *, retry_after: int | None = None) -> JSONResponse:
    """The protocol's error object; counted like the service's own errors."""
    (metrics.INFERENCE_ERRORS if status >= 500 else metrics.BAD_INPUT).labels(reason=code).inc()
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": f"{code}: {detail}"}, status_code=status, headers=headers)


def _bad(detail: str, code: str = "invalid_tensor") -> RequestRejected:
    return RequestRejected(code, detail, 400)


def _ready() -> bool:
    svc = _service()
    return bool(getattr(svc, "ready", False)) and gateway.current().breaker.state != OPEN


def _model(request: Request) -> Response | None:
    """None when the path names the served model (and version, when given); the protocol's 404 otherwise."""
    info = _service().model_info
    name, version = request.path_params["name"], request.path_params.get("version")
    if name != info.name:
        return _error(404, "unknown_model", f"model {name!r} is not served here (this service serves "
                      f"{info.name!r}, version {info.version!r})")
    if version is not None and version != info.version:
        return _error(404, "unknown_version", f"model {name!r} version {version!r} is not loaded (the loaded "
                      f"version is {info.version!r})")
    return None


async def server_metadata(request: Request) -> Response:
    """GET /v2."""
    try:
        version = importlib_metadata.version("detops")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return JSONResponse({"name": "detops", "version": version, "extensions": list(EXTENSIONS)})


async def live(request: Request) -> Response:
    """GET /v2/health/live: the worker answers."""
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    """GET /v2/health/ready: the model is loaded and the inference circuit is not open."""
    ok = _ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def model_metadata(request: Request) -> Response:
    """GET /v2/models/{name}[/versions/{version}]: inputs, outputs, class names."""
    if (refused := _model(request)) is not None:
        return refused
    svc = _service()
    info, card = svc.model_info, svc.runtime.card
    return JSONResponse({
        "name": info.name, "versions": [info.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                   {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, card.imgsz, card.imgsz]}],
        "outputs": [{"name": DETECTIONS_OUTPUT, "datatype": "FP32", "shape": [-1, -1, 6]},
                    {"name": COUNT_OUTPUT, "datatype": "INT32", "shape": [-1]}],
        "properties": {"classes": json.dumps(svc.runtime.class_names), "alias": str(info.alias),
                       "detections_columns": "x1,y1,x2,y2,confidence,class_id"}})


async def model_ready(request: Request) -> Response:
    """GET /v2/models/{name}[/versions/{version}]/ready."""
    if (refused := _model(request)) is not None:
        return refused
    ok = _ready()
    return JSONResponse({"name": _service().model_info.name, "ready": ok}, status_code=200 if ok else 503)


async def infer(request: Request) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer (JSON or binary tensor data)."""
    if (refused := _model(request)) is not None:
        return refused
    svc = _service()
    try:
        body = await _read_body(request, body_limit(svc))
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        params = _parameters(header.get("parameters"))
        files = _images(header.get("inputs"), binary, svc.runtime.card.imgsz, _settings().max_batch_images)
        wanted = _outputs(header.get("outputs"), bool(params.pop("binary_data_output", False)))
        results = await svc._predict(files, params.get("conf"), params.get("iou"), params.get("max_det"), None)
    except RequestRejected as exc:
        return _error(exc.status, exc.code, exc.detail, retry_after=exc.retry_after)
    except ClientDisconnect:
        return _error(400, "incomplete_body", "the request body ended early")
    except Exception:  # a bug, not bad input: traceback to the log, a JSON 500 to the client
        log.exception("unexpected error in %s", request.url.path)
        return _error(500, "internal_error", "unexpected error in inference; see the server log")
    tensors = _detection_tensors([answer.detections for answer, _ in results])
    info = svc.model_info
    answer: dict[str, Any] = {"model_name": info.name, "model_version": info.version, "outputs": []}
    if isinstance(header.get("id"), str):
        answer["id"] = header["id"]
    chunks = []
    for name, binary_out in wanted:
        array = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": "FP32" if array.dtype.kind == "f" else "INT32",
                               "shape": list(array.shape)}
        if binary_out:
            raw = np.ascontiguousarray(array, dtype=_DTYPES[out["datatype"]]).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = array.ravel().tolist()
        answer["outputs"].append(out)
    headers = {"X-Cache": ",".join("hit" if hit else "miss" for _, hit in results)}
    text = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return Response(text, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(text))
    return Response(text + b"".join(chunks), media_type="application/octet-stream", headers=headers)


def _settings() -> Any:
    """The service's `serve:` settings (serving/service.py loads them; imported late: it mounts this app)."""
    from serving.service import CFG

    return CFG


def body_limit(svc: Any) -> int:
    """The largest /infer body: serve.max_batch_images images, each as base64 of serve.max_upload_bytes
    or as an FP32 input tensor in JSON text, whichever is larger, plus room for the envelope."""
    cfg, size = _settings(), svc.runtime.card.imgsz
    per_image = max(cfg.max_upload_bytes * 4 // 3 + 4, 3 * size * size * JSON_FLOAT_BYTES)
    return cfg.max_batch_images * per_image + 64 * 1024


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it is over `limit` (announced or received)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestRejected("file_too_large", f"request body of {int(length)} bytes is over the limit of "
                              f"{limit} bytes for /infer (serve.max_upload_bytes x serve.max_batch_images)", 413)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected("file_too_large", f"request body is over the limit of {limit} bytes for "
                                  "/infer (serve.max_upload_bytes x serve.max_batch_images)", 413)
        parts.append(chunk)
    return b"".join(parts)


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference request and the binary tensor data after it (binary tensor data extension)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length!r} is not a byte count within the "
                       f"body of {len(body)} bytes", "invalid_header")
        json_part, binary = body[:int(header_length)], body[int(header_length):]
    try:
        header = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the inference request is not valid JSON ({exc})", "invalid_json") from None
    if not isinstance(header, dict):
        raise _bad("the inference request must be a JSON object with `inputs`", "invalid_json")
    return header, binary


def _parameters(raw: Any) -> dict[str, Any]:
    """The request's `parameters`, checked by type; ranges are checked with /detect's own rules."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("parameters must be a JSON object", "invalid_parameter")
    unknown = sorted(set(raw) - set(PARAMETERS))
    if unknown:
        raise _bad(f"unknown parameters {unknown} (known: {', '.join(PARAMETERS)})", "invalid_parameter")
    for name, value in raw.items():
        if name == "binary_data_output":
            ok, kind = isinstance(value, bool), "a boolean"
        elif name == "max_det":
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            kind = "a number"
        if not ok:
            raise _bad(f"parameter {name}: {value!r} is not {kind}", "invalid_parameter")
    return dict(raw)


def _outputs(raw: Any, binary_default: bool) -> list[tuple[str, bool]]:
    """(output name, as binary data) in the order asked for; both outputs when none are named."""
    if raw is None:
        return [(DETECTIONS_OUTPUT, binary_default), (COUNT_OUTPUT, binary_default)]
    if not isinstance(raw, list) or not raw:
        raise _bad("outputs must be a non-empty list of {\"name\": ...} objects", "invalid_output")
    wanted = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in (DETECTIONS_OUTPUT, COUNT_OUTPUT):
            raise _bad(f"unknown output {name!r} (outputs: {DETECTIONS_OUTPUT}, {COUNT_OUTPUT})", "invalid_output")
        params = item.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        if not isinstance(binary, bool):
            raise _bad(f"output {name}: parameters.binary_data must be a boolean", "invalid_output")
        wanted.append((name, binary))
    return wanted


def _images(inputs: Any, binary: bytes, size: int, max_images: int) -> list[bytes]:
    """The request's images as encoded bytes, one per element of its one input tensor."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"inputs must hold exactly one tensor: {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (FP32)",
                   "invalid_input")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    expected = {IMAGE_INPUT: "BYTES", PIXELS_INPUT: "FP32"}
    if name not in expected:
        raise _bad(f"unknown input {name!r} (inputs: {IMAGE_INPUT} BYTES, {PIXELS_INPUT} FP32)", "invalid_input")
    if datatype != expected[name]:
        raise _bad(f"input {name}: datatype {datatype!r}, expected {expected[name]}", "invalid_input")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _bad(f"input {name}: shape must be a list of non-negative integers (got {shape!r})", "invalid_input")
    count = math.prod(shape) if name == IMAGE_INPUT else shape[0]
    if name == PIXELS_INPUT and shape[1:] != [3, size, size]:
        raise _bad(f"input {name}: shape {shape}, expected [B, 3, {size}, {size}] (the model's letterboxed "
                   "input)", "invalid_input")
    if count < 1:
        raise _bad(f"input {name}: shape {shape} holds no image", "invalid_input")
    if count > max_images:
        raise RequestRejected("too_many_images", f"input {name}: {count} images is over the limit of "
                              f"{max_images} per request (serve.max_batch_images)", 413)
    params = tensor.get("parameters") or {}
    size_bytes = params.get("binary_data_size") if isinstance(params, dict) else None
    if size_bytes is not None:
        if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes != len(binary):
            raise _bad(f"input {name}: binary_data_size {size_bytes!r} does not match the {len(binary)} bytes of "
                       "binary data after the JSON header", "invalid_input")
        if name == IMAGE_INPUT:
            return _unpack_bytes(binary, count, name)
        return _pixels_to_png(_fp32(binary, shape, name))
    if binary:
        raise _bad(f"input {name}: {len(binary)} bytes of binary data but no binary_data_size", "invalid_input")
    if "data" not in tensor:
        raise _bad(f"input {name}: no data (and no binary_data_size)", "invalid_input")
    if name == IMAGE_INPUT:
        return _base64_elements(tensor["data"], count, name)
    try:
        array = np.asarray(tensor["data"], dtype=np.float32)
    except (ValueError, TypeError):
        raise _bad(f"input {name}: data must be numbers", "invalid_input") from None
    if array.size != math.prod(shape):
        raise _bad(f"input {name}: {array.size} values for shape {shape}", "invalid_input")
    return _pixels_to_png(array.reshape(shape))


def _unpack_bytes(buffer: bytes, count: int, name: str) -> list[bytes]:
    """A BYTES tensor's binary form: each element is a 4-byte little-endian length and its bytes."""
    out, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise _bad(f"input {name}: truncated element length at byte {offset}", "invalid_input")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise _bad(f"input {name}: element {len(out)} of {length} bytes runs past the binary data",
                       "invalid_input")
        out.append(buffer[offset:offset + length])
        offset += length
    if len(out) != count:
        raise _bad(f"input {name}: {len(out)} elements in the binary data, the shape says {count}", "invalid_input")
    return out


def _base64_elements(data: Any, count: int, name: str) -> list[bytes]:
    """A BYTES tensor in JSON: each element the base64 text of one encoded image."""
    flat = np.asarray(data, dtype=object).ravel().tolist() if isinstance(data, list) else None
    if flat is None or len(flat) != count or not all(isinstance(e, str) for e in flat):
        raise _bad(f"input {name}: data must be {count} base64 strings (one encoded image each)", "invalid_input")
    try:
        return [base64.b64decode(e, validate=True) for e in flat]
    except (binascii.Error, ValueError):
        raise _bad(f"input {name}: an element is not valid base64 (JSON BYTES elements are the base64 of "
                   "each encoded image)", "invalid_input") from None


def _fp32(buffer: bytes, shape: Sequence[int], name: str) -> np.ndarray:
    expected = math.prod(shape) * 4
    if len(buffer) != expected:
        raise _bad(f"input {name}: {len(buffer)} bytes of FP32 data, the shape {list(shape)} needs {expected}",
                   "invalid_input")
    return np.frombuffer(buffer, dtype="<f4").reshape(shape)


def _pixels_to_png(batch: np.ndarray) -> list[bytes]:
    """Letterboxed FP32 [B, 3, S, S] in [0, 1] -> one lossless PNG per image (8-bit, as the model sees
    them), so that they go through the same decode, cache, batching and log as uploaded images."""
    import cv2

    if not np.isfinite(batch).all() or batch.min() < 0 or batch.max() > 1:
        raise _bad(f"input {PIXELS_INPUT}: values must be finite and within [0, 1] (RGB scaled by 1/255)",
                   "invalid_input")
    pixels = np.rint(batch * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (B, S, S, 3) RGB
    out = []
    for image in pixels:
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError("PNG encoding of an input tensor failed")
        out.append(png.tobytes())
    return out


def _detection_tensors(per_image: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
    """Detections of each image -> `detections` FP32 [B, D, 6] (zero-padded) and `num_detections` INT32 [B]."""
    width = max((len(dets) for dets in per_image), default=0)
    table = np.zeros((len(per_image), width, 6), dtype=np.float32)
    for i, dets in enumerate(per_image):
        for j, d in enumerate(dets):
            table[i, j] = (d.box.x1, d.box.y1, d.box.x2, d.box.y2, d.confidence, d.class_id)
    return {DETECTIONS_OUTPUT: table,
            COUNT_OUTPUT: np.asarray([len(dets) for dets in per_image], dtype=np.int32)}


_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"
app = Starlette(routes=[
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/", server_metadata, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    *(Route(base, model_metadata, methods=["GET"]) for base in (_MODEL, _VERSION)),
    *(Route(base + "/ready", model_ready, methods=["GET"]) for base in (_MODEL, _VERSION)),
    *(Route(base + "/infer", infer, methods=["POST"]) for base in (_MODEL, _VERSION)),
])
