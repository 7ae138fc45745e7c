"""The BentoML service: `bentoml serve serving.service:Detector` (from the repository root).

Public endpoints validate and decode uploads themselves (serving/imaging.py), so a bad file is a 4xx
for its own request only, then hand the letterboxed pixels to the worker's in-process adaptive
batcher (serving/batching.py; no HTTP self-call, batches fill without waiting): concurrent
requests (and the images of one /detect_batch call) run as one ONNX batch, and each request's slice
is post-processed with its own thresholds in the same thread. Settings: params.yaml `serve:` and
DETOPS_SERVE_* variables (serving/settings.py); the model: `detops build` (serving/build.py).
Durable jobs (`/jobs`, run by `detops worker` processes) are a FastAPI app of serving/jobs/ mounted here.
The Open Inference Protocol (`/v2/...`, KServe V2 / Triton REST) is a Starlette app of
serving/inference_protocol.py mounted here; its inference runs through `_predict` like /detect.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import logging
import os
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NoReturn

import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response

from pipelines import environment

environment.configure()

from pipelines.errors import DetopsError  # noqa: E402
from pipelines.types import Detection  # noqa: E402
from serving import metrics  # noqa: E402
from serving.batching import InferenceBatcher, InferenceFailed, Overloaded  # noqa: E402
from serving.cache import ResultCache, cache_key  # noqa: E402
from serving.forms import DetectBatchInput, DetectInput  # noqa: E402
from serving.gateway import build_state, context, logs  # noqa: E402
from serving.gateway import docs as api_docs  # noqa: E402
from serving.gateway.middleware import Gateway  # noqa: E402
from serving.gateway.scopes import PUBLIC_PATHS, PUBLIC_PREFIXES  # noqa: E402
from serving.guard import REQUEST_TRAFFIC, RequestGuard  # noqa: E402
from serving.imaging import RequestRejected, check_size, decode_image, decode_rgb  # noqa: E402
from serving import inference_protocol  # noqa: E402
from serving.jobs import api as jobs_api  # noqa: E402
from serving.render import draw_detections, encode_jpeg  # noqa: E402
from serving.runtime import InvalidParams, LetterboxMeta, ModelRuntime, PredictParams  # noqa: E402
from serving.schemas import DetectResponse, ModelInfo, detect_response, error_response  # noqa: E402
from serving.settings import load_gateway_config, load_jobs_config, load_serve_config, ort_threads  # noqa: E402

CFG = load_serve_config()
JOBS_CFG = load_jobs_config()
GATEWAY_CFG = load_gateway_config()
GATEWAY = build_state(GATEWAY_CFG)  # keys, limits, circuit breaker, dependency probes (serving/gateway/)
logs.configure()
MODEL = bentoml.models.BentoModel(f"{CFG.model_name}:{CFG.store_version}")  # a class attribute: packed in the bento
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Answer:
    """One image's answer, as cached: its size, detections and the JSON body of /detect (a cache hit
    is answered with these bytes, without decoding the image)."""

    width: int
    height: int
    sha256: str
    detections: tuple[Detection, ...]
    body: bytes


@dataclass
class _Prepared:
    """A request's images: their bytes and SHA-256, the cached answers (None: a miss), and the misses
    decoded and letterboxed into one uint8 (n, S, S, 3) stack with where each image sits in it."""

    data: list[bytes]
    sha256: list[str]
    found: list[_Answer | None]
    keys: list[tuple] = field(default_factory=list)  # empty when the cache is off
    hits: list[bool] = field(default_factory=list)
    pixels: dict[int, np.ndarray] = field(default_factory=dict)  # decoded misses, by index
    batch: np.ndarray | None = None  # None when every image was a cache hit
    metas: list[LetterboxMeta] = field(default_factory=list)


@bentoml.asgi_app(jobs_api.app, path="/")  # POST/GET/DELETE /jobs...: durable jobs (serving/jobs/api.py)
@bentoml.asgi_app(inference_protocol.app, path="/")  # /v2...: Open Inference Protocol (KServe V2, Triton)
# BentoML's own access log is off: the gateway writes the one access log (JSON, with request id and
# tenant: serving/gateway/logs.py). Its tracing middleware skips every URL unless serve.tracing.
@bentoml.service(name="detector", workers=CFG.workers, traffic={"timeout": CFG.timeout_s},
                 logging={"access": {"enabled": False}},
                 **({} if CFG.tracing else {"tracing": {"excluded_urls": ".*"}}))
class Detector:
    """Object detection with a calibrated YOLO model imported from the MLflow registry."""

    model = MODEL

    def __init__(self) -> None:
        from monitoring.logger import PredictionLogger

        try:  # auth on without DETOPS_KEY_PEPPER, or off on a network address
            GATEWAY.check()
        except DetopsError as exc:
            _refuse_start(exc)

        self.runtime = ModelRuntime.load(Path(self.model.path), threads=ort_threads(CFG))
        self.model_info = served_model()
        metrics.MODEL_INFO.labels(self.model_info.name, self.model_info.version, str(self.model_info.alias),
                                  str(self.model.tag)).set(1)
        self.cache: ResultCache[_Answer] = ResultCache(CFG.cache_entries)
        # It remembers the features of as many images as the cache holds answers: a hit is logged free.
        self.pred_log = PredictionLogger(CFG.prediction_log, class_names=self.runtime.class_names,
                                         keep_images=CFG.keep_images, remember=CFG.cache_entries)
        # One adaptive batcher per worker; its dispatch task starts inside the event loop on first use.
        self.batcher = InferenceBatcher(self._infer_letterboxed, max_batch_size=CFG.max_batch_size,
                                        max_latency_ms=CFG.max_latency_ms,
                                        on_batch=metrics.INFERENCE_BATCH_SIZE.observe)
        # Ready only once a real inference went through the model.
        size = self.runtime.card.imgsz
        self.runtime.predict([np.full((size, size, 3), 114, np.uint8)])
        if GATEWAY.monitor is not None:
            GATEWAY.monitor.start()
        # What startup made lives as long as the worker: out of the collector's sight, a full collection
        # no longer walks it. Those walks were the cache hits' p99 (28-79 ms -> 7-16 ms, docs/performance.md).
        gc.collect()
        gc.freeze()
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.batcher.close()
        self.pred_log.close()
        if GATEWAY.monitor is not None:
            GATEWAY.monitor.stop()

    @bentoml.api(route="/detect", input_spec=DetectInput)
    async def detect(self, image: Path, conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, classes: list[int] | None = None) -> DetectResponse:
        """Detect objects in one image, sent as the multipart field `image` or as the raw request body
        (`Content-Type: image/jpeg`, `image/png`, ...; options as query parameters).
        Response headers `X-Cache: hit|miss`, `X-Model-Version`."""
        return await self._detect_response([image], conf, iou, max_det, classes, single=True)

    @bentoml.api(route="/detect_batch", input_spec=DetectBatchInput)
    async def detect_batch(self, images: list[Path], conf: float | None = None, iou: float | None = None,
                           max_det: int | None = None, classes: list[int] | None = None) -> list[DetectResponse]:
        """Detect objects in several images (at most serve.max_batch_images); results in upload order.
        `X-Cache` lists hit/miss per image."""
        if len(images) > CFG.max_batch_images:
            metrics.BAD_INPUT.labels(reason="too_many_images").inc()
            return error_response("too_many_images", f"images: {len(images)} files is over the limit of "
                                  f"{CFG.max_batch_images} per request (serve.max_batch_images)", 413)
        return await self._detect_response(images, conf, iou, max_det, classes, single=False)

    @bentoml.api(route="/render", input_spec=DetectInput)
    async def render(self, image: Path, conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, classes: list[int] | None = None
                     ) -> Annotated[Path, ContentType("image/jpeg")]:
        """The image as JPEG with its boxes, class names and confidences drawn (multipart or raw body)."""
        try:
            (answer, _), = await self._predict([image], conf, iou, max_det, classes)
            rgb = await asyncio.to_thread(self._decode, image, "image")
            jpeg = await asyncio.to_thread(self._render, rgb, list(answer.detections))
        except RequestRejected as exc:
            return self._rejected(exc)
        except Exception:
            return self._unexpected("/render")
        return Response(jpeg, media_type="image/jpeg")

    # ------------------------------------------------------------------ mechanics
    async def _detect_response(self, files: list[Path], conf: float | None, iou: float | None,
                               max_det: int | None, classes: list[int] | None, *, single: bool) -> Response:
        try:
            results = await self._predict(files, conf, iou, max_det, classes)
        except RequestRejected as exc:
            return self._rejected(exc)
        except Exception:
            return self._unexpected("detection")
        headers = {"X-Cache": ",".join("hit" if hit else "miss" for _, hit in results)}
        # The cached JSON bodies as they are: a cache hit costs a hash and a lookup.
        body = results[0][0].body if single else b"[" + b",".join(a.body for a, _ in results) + b"]"
        return Response(body, media_type="application/json", headers=headers)

    async def _predict(self, files: list[Path | bytes], conf: float | None, iou: float | None, max_det: int | None,
                       classes: list[int] | None) -> list[tuple[_Answer, bool]]:
        """Hash every upload and answer from the cache where possible; decode the rest (all must be
        valid) and run them through the runtime's steps, batching `infer` across requests; log each
        prediction with the request's traffic (live, or the shadow/canary traffic of a rollout's
        verification) and tenant. Raises RequestRejected for bad input (4xx), the key's limits and the
        tenant's quota (429), overload and an open circuit (503) and any failure of the inference (500)."""
        tenant = context.current_tenant()
        GATEWAY.limits.images_now(context.KEY_ID.get(), tenant, len(files))
        GATEWAY.limits.images_today(tenant, len(files))
        try:
            params = self.runtime.resolve(conf, iou, max_det, classes)
        except InvalidParams as exc:
            raise RequestRejected("unknown_class" if exc.field == "classes" else "invalid_parameter",
                                  str(exc), 422) from None
        # One thread hop per request for the CPU work before inference (decode, hash, cache, letterbox).
        job = await asyncio.to_thread(self._prepare, files, params, tenant)
        if job.batch is not None:
            GATEWAY.breaker.before()  # 503 circuit_open at once while inference keeps failing
            try:
                # NMS and calibration of this request's rows run in the inference thread after its batch.
                fresh = await self.batcher(job.batch, then=functools.partial(self.runtime.postprocess,
                                                                               metas=job.metas, params=params))
            except Overloaded as exc:
                raise RequestRejected("overloaded", str(exc), 503, retry_after=1) from None
            except InferenceFailed as exc:  # logged with its traceback by the batcher
                GATEWAY.breaker.failed()
                raise RequestRejected("inference_failed", f"{exc}; see the server log", 500) from None
            except Exception as exc:  # never a traceback to the client: logged here, a JSON 500 there
                GATEWAY.breaker.failed()
                log.exception("inference of %d images failed", len(job.batch))
                raise RequestRejected("inference_failed", f"the model could not process this request "
                                      f"({type(exc).__name__}: {exc}); see the server log", 500) from None
            GATEWAY.breaker.succeeded()
            for i, dets in zip(sorted(job.pixels), fresh):
                height, width = job.pixels[i].shape[:2]
                body = json.dumps(detect_response(width, height, job.sha256[i], dets, self.runtime.class_names,
                                                  self.model_info), separators=(",", ":")).encode()
                job.found[i] = _Answer(width, height, job.sha256[i], tuple(dets), body)
                if job.keys:
                    self.cache.put(job.keys[i], job.found[i])
        if self.cache.max_entries:
            for hit in job.hits:
                metrics.CACHE.labels(result="hit" if hit else "miss").inc()
        results = []
        for i, (answer, hit) in enumerate(zip(job.found, job.hits)):
            metrics.observe_detections(answer.detections)
            # A hit's pixels are not decoded: the logger's featurizer process reuses the features it
            # remembers for this SHA-256, and decodes (there, at low priority) only an image it forgot.
            pixels = job.pixels.get(i)
            if pixels is None:
                pixels = functools.partial(decode_rgb, job.data[i], max_bytes=CFG.max_upload_bytes,
                                           max_pixels=CFG.max_pixels)
            self.pred_log.log(pixels, sha256=answer.sha256, request_id=uuid.uuid4().hex,
                              detections=answer.detections, model_name=self.model_info.name,
                              model_version=self.model_info.version, traffic=REQUEST_TRAFFIC.get(),
                              tenant=tenant)
            results.append((answer, hit))
        return results

    def _prepare(self, files: list[Path | bytes], params: PredictParams, tenant: str) -> _Prepared:
        """In a worker thread: read and hash every upload, look each up in the tenant's cache, decode
        and validate the misses (all of them, before any inference) and letterbox them into one uint8
        (n, S, S, 3) stack."""
        names = [f"images[{i}]" for i in range(len(files))] if len(files) > 1 else ["image"]
        data = [self._read(f, name) for f, name in zip(files, names)]
        job = _Prepared(data, [hashlib.sha256(d).hexdigest() for d in data], found=[None] * len(data))
        if self.cache.max_entries:
            job.keys = [cache_key(sha, self.model_info.version, params, tenant) for sha in job.sha256]
            job.found = [self.cache.get(k) for k in job.keys]
        job.hits = [answer is not None for answer in job.found]
        job.pixels = {i: self._decode(data[i], names[i]) for i, hit in enumerate(job.hits) if not hit}
        if job.pixels:
            job.batch, job.metas = self.runtime.letterbox([job.pixels[i] for i in sorted(job.pixels)])
        return job

    def _infer_letterboxed(self, batch: np.ndarray) -> np.ndarray:
        """Letterboxed RGB uint8 (N, S, S, 3) -> raw model output; runs in the batcher's worker thread."""
        return self.runtime.infer(self.runtime.to_input(batch))

    @staticmethod
    def _read(file: Path | bytes, name: str) -> bytes:
        """The upload's bytes: a raw request body as it came, a multipart file read from its spool."""
        if isinstance(file, bytes):
            check_size(len(file), CFG.max_upload_bytes, name)
            return file
        check_size(file.stat().st_size, CFG.max_upload_bytes, name)  # before reading it into memory
        return file.read_bytes()

    @classmethod
    def _decode(cls, file: Path | bytes, name: str) -> np.ndarray:
        """The upload's RGB pixels (validated: format, size, pixel count; RequestRejected otherwise)."""
        data = cls._read(file, name)
        return decode_image(data, max_bytes=CFG.max_upload_bytes, max_pixels=CFG.max_pixels, name=name).rgb

    def _render(self, rgb: np.ndarray, dets: list[Detection]) -> bytes:
        return encode_jpeg(draw_detections(rgb, dets, self.runtime.class_names))

    @classmethod
    def _unexpected(cls, what: str) -> JSONResponse:
        """A bug, not bad input: the traceback goes to the server log, the client gets a JSON 500."""
        log.exception("unexpected error in %s", what)
        return cls._rejected(RequestRejected("internal_error",
                                             f"unexpected error in {what}; see the server log", 500))

    @staticmethod
    def _rejected(exc: RequestRejected) -> JSONResponse:
        (metrics.INFERENCE_ERRORS if exc.status >= 500 else metrics.BAD_INPUT).labels(reason=exc.code).inc()
        return error_response(exc.code, exc.detail, exc.status, retry_after=exc.retry_after)


def _refuse_start(problem: DetopsError) -> NoReturn:
    """A setting forbids serving: say why in one line and stop the whole `bentoml serve`, not only this
    worker, which BentoML would otherwise restart forever behind a server that never becomes ready."""
    log.critical("refusing to start: %s", problem)
    if bentoml.server_context.worker_index is not None:  # a worker of `bentoml serve`: its parent is the server
        os.kill(os.getppid(), signal.SIGTERM)
    raise SystemExit(2)


@functools.cache
def served_model() -> ModelInfo:
    """The registry model this service answers with (the labels `detops build` gave the BentoML model)."""
    info = MODEL.resolve().info
    labels = info.labels
    return ModelInfo(name=labels.get("registry_name", info.metadata.get("card_name", CFG.model_name)),
                     version=labels.get("registry_version", f"local:{info.tag.version}"), alias=labels.get("alias"))


# BentoML's request metrics by route template, not raw path (a series per job id grew every worker).
metrics.label_http_metrics_by_route(metrics.RouteLabels(
    {api.route for api in Detector.apis.values()} | PUBLIC_PATHS, (jobs_api.app, inference_protocol.app),
    prefixes=PUBLIC_PREFIXES))

Detector.add_asgi_middleware(RequestGuard, model_version=lambda: served_model().version, upload_limits={
    "/detect": (CFG.max_upload_bytes, "serve.max_upload_bytes"), "/render": (CFG.max_upload_bytes, "serve.max_upload_bytes"),
    "/detect_batch": (CFG.max_upload_bytes * CFG.max_batch_images, "serve.max_upload_bytes x serve.max_batch_images"),
    "/jobs": (jobs_api.body_limit(JOBS_CFG), "jobs.max_job_bytes")})

# The gateway (serving/gateway/) wraps everything: request ids, keys and scopes, rates, fast 503s,
# the JSON /readyz, and detops' own API documentation at / and /docs.json.
GATEWAY.openapi = lambda: api_docs.openapi_document(Detector.openapi_spec.asdict(), model_version=served_model().version,
                                                    description=_api_description())
GATEWAY.index = lambda: api_docs.index_page("detops detection API", f"<pre>{_api_description()}</pre>")
Detector.add_asgi_middleware(Gateway, state=GATEWAY)


def _api_description() -> str:
    model = served_model()
    limits = {"upload per image": f"{CFG.max_upload_bytes} bytes (serve.max_upload_bytes)",
              "pixels per image": f"{CFG.max_pixels} (serve.max_pixels)",
              "images per /detect_batch": f"{CFG.max_batch_images} (serve.max_batch_images)",
              "requests per second per key": f"{GATEWAY_CFG.requests_per_s} (gateway.requests_per_s)",
              "images per second per key": f"{GATEWAY_CFG.images_per_s} (gateway.images_per_s)",
              "images per day per tenant": f"{GATEWAY_CFG.images_per_day} (gateway.images_per_day, per tenant)",
              "images per job": f"{min(GATEWAY_CFG.max_job_images, JOBS_CFG.max_images_per_job)} "
                                "(jobs.max_images_per_job, gateway.max_job_images)",
              "bytes per job": f"{JOBS_CFG.max_job_bytes} (jobs.max_job_bytes)"}
    return api_docs.api_description(model=model.name, model_version=model.version, limits=limits,
                                    auth=GATEWAY_CFG.auth)
