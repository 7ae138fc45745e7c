"""The BentoML service: `bentoml serve serving.service:Detector` (from the repository root).

Public endpoints validate and decode uploads themselves (serving/imaging.py), so a bad file is a 4xx
for its own request only, then send the letterboxed pixels to `infer`, BentoML's adaptive-batching
API: concurrent requests (and the images of one /detect_batch call) run as one ONNX batch, and each
request post-processes its own slice with its own thresholds. Settings: params.yaml `serve:` and
DETOPS_SERVE_* variables (serving/settings.py); the model: `detops build` (serving/build.py).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType, DType
from starlette.responses import JSONResponse, Response

from pipelines import environment

environment.configure()

from pipelines.types import Detection  # noqa: E402
from serving import metrics  # noqa: E402
from serving.cache import ResultCache, cache_key  # noqa: E402
from serving.forms import DetectBatchInput, DetectInput  # noqa: E402
from serving.guard import INTERNAL_HEADER, INTERNAL_ROUTE, INTERNAL_TOKEN, RequestGuard  # noqa: E402
from serving.imaging import DecodedImage, RequestRejected, check_size, decode_image  # noqa: E402
from serving.render import draw_detections, encode_jpeg  # noqa: E402
from serving.runtime import ModelRuntime, letterbox  # noqa: E402
from serving.schemas import DetectResponse, ModelInfo, detect_response, error_response  # noqa: E402
from serving.settings import load_serve_config, ort_threads  # noqa: E402

CFG = load_serve_config()

@bentoml.service(name="detector", workers=CFG.workers, traffic={"timeout": CFG.timeout_s})
class Detector:
    """Object detection with a calibrated YOLO model imported from the MLflow registry."""

    model = bentoml.models.BentoModel(f"{CFG.model_name}:{CFG.store_version}")

    def __init__(self) -> None:
        from monitoring.logger import PredictionLogger

        self.runtime = ModelRuntime.load(Path(self.model.path), threads=ort_threads(CFG))
        labels = self.model.info.labels
        self.model_info = ModelInfo(name=labels.get("registry_name", self.runtime.card.name),
                                    version=labels.get("registry_version", f"local:{self.model.tag.version}"),
                                    alias=labels.get("alias"))
        metrics.MODEL_INFO.labels(self.model_info.name, self.model_info.version, str(self.model_info.alias),
                                  str(self.model.tag)).set(1)
        self.cache: ResultCache[tuple[Detection, ...]] = ResultCache(CFG.cache_entries)
        self.pred_log = PredictionLogger(CFG.prediction_log, class_names=self.runtime.class_names,
                                         keep_images=CFG.keep_images)
        # Ready only once a real inference went through the model.
        size = self.runtime.card.imgsz
        self.runtime.predict([np.full((size, size, 3), 114, np.uint8)])
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def _close_log(self) -> None:
        self.pred_log.close()

    @bentoml.api(route=INTERNAL_ROUTE, batchable=True, batch_dim=0, max_batch_size=CFG.max_batch_size,
                 max_latency_ms=CFG.max_latency_ms)
    def infer(self, batch: Annotated[np.ndarray, DType("uint8")]) -> np.ndarray:
        """Internal: letterboxed RGB uint8 (N, S, S, 3) -> raw model output (N, 4 + classes, anchors)."""
        scale = np.float32(self.runtime.card.preprocessing.scale)
        return self.runtime.infer(np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) * scale)

    @bentoml.api(route="/detect", input_spec=DetectInput)
    async def detect(self, image: Path, conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, classes: list[int] | None = None) -> DetectResponse:
        """Detect objects in one image. Response header `X-Cache: hit|miss`."""
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

    @bentoml.task(route="/detect_async", input_spec=DetectInput)
    async def detect_async(self, image: Path, conf: float | None = None, iou: float | None = None,
                           max_det: int | None = None, classes: list[int] | None = None) -> DetectResponse:
        """/detect as a task: POST /detect_async/submit, then GET /status and /get with the task_id.
        Not durable: results are lost when the server restarts."""
        return await self._detect_response([image], conf, iou, max_det, classes, single=True)

    @bentoml.api(route="/render", input_spec=DetectInput)
    async def render(self, image: Path, conf: float | None = None, iou: float | None = None,
                     max_det: int | None = None, classes: list[int] | None = None
                     ) -> Annotated[Path, ContentType("image/jpeg")]:
        """The image as JPEG with its boxes, class names and confidences drawn."""
        try:
            (decoded, dets, _), = await self._predict([image], conf, iou, max_det, classes)
        except RequestRejected as exc:
            return self._rejected(exc)
        drawn = await asyncio.to_thread(draw_detections, decoded.rgb, dets, self.runtime.class_names)
        return Response(await asyncio.to_thread(encode_jpeg, drawn), media_type="image/jpeg")

    # ------------------------------------------------------------------ mechanics
    async def _detect_response(self, files: list[Path], conf: float | None, iou: float | None,
                               max_det: int | None, classes: list[int] | None, *, single: bool) -> Response:
        try:
            results = await self._predict(files, conf, iou, max_det, classes)
        except RequestRejected as exc:
            return self._rejected(exc)
        bodies = [detect_response(d.width, d.height, d.sha256, dets, self.runtime.class_names,
                                  self.model_info).model_dump() for d, dets, _ in results]
        headers = {"X-Cache": ",".join("hit" if hit else "miss" for *_, hit in results)}
        return JSONResponse(bodies[0] if single else bodies, headers=headers)

    async def _predict(self, files: list[Path], conf: float | None, iou: float | None, max_det: int | None,
                       classes: list[int] | None) -> list[tuple[DecodedImage, list[Detection], bool]]:
        """Decode every file (all must be valid), answer from the cache where possible and run the
        rest through the batched `infer` in one call; log each prediction."""
        t = self.runtime.card.thresholds
        conf = t.conf if conf is None else conf
        iou = t.iou if iou is None else iou
        max_det = t.max_det if max_det is None else max_det
        bad = sorted({c for c in classes or () if not 0 <= c < len(self.runtime.class_names)})
        if bad:
            raise RequestRejected("unknown_class", f"classes: unknown class ids {bad} (the model has "
                                f"{len(self.runtime.class_names)}: {', '.join(self.runtime.class_names)})", 422)
        decoded = [await asyncio.to_thread(self._decode, f, f"images[{i}]" if len(files) > 1 else "image")
                   for i, f in enumerate(files)]
        keys = [cache_key(d.sha256, self.model_info.version, conf=conf, iou=iou, max_det=max_det, classes=classes)
                for d in decoded]
        found = [self.cache.get(k) for k in keys]
        hits = [f is not None for f in found]
        todo = [i for i, hit in enumerate(hits) if not hit]
        for hit in hits:
            metrics.CACHE.labels(result="hit" if hit else "miss").inc()
        if todo:
            size, pad = self.runtime.card.imgsz, self.runtime.card.preprocessing.pad_value
            boxed = [letterbox(decoded[i].rgb, size, pad) for i in todo]
            raw = await self._infer_batched(np.stack([b for b, _ in boxed]))
            fresh = self.runtime.postprocess(raw, [m for _, m in boxed], conf=conf, iou=iou, max_det=max_det,
                                             classes=classes)
            for i, dets in zip(todo, fresh):
                found[i] = tuple(dets)
                self.cache.put(keys[i], found[i])
        results = []
        for d, dets, hit in zip(decoded, found, hits):
            metrics.observe_detections(dets)
            self.pred_log.log(d.rgb, sha256=d.sha256, request_id=uuid.uuid4().hex, detections=list(dets),
                              model_name=self.model_info.name, model_version=self.model_info.version)
            results.append((d, list(dets), hit))
        return results

    async def _infer_batched(self, batch: np.ndarray) -> np.ndarray:
        """Call `infer` through BentoML's in-process client so the request joins the adaptive batch."""
        client = self.to_async  # BentoML's in-process client, set once the instance is created
        # Its connection sessions are (re)made from this very dict: the token reaches the guard.
        client.default_headers[INTERNAL_HEADER] = INTERNAL_TOKEN
        try:
            return np.asarray(await client.infer(batch=batch))
        except BentoMLException as exc:  # the batch could not meet max_latency_ms, or the worker is overloaded
            status = int(exc.error_code)
            raise RequestRejected("overloaded" if status == 503 else "inference_failed", str(exc), status) from None

    @staticmethod
    def _decode(file: Path, name: str) -> DecodedImage:
        check_size(file.stat().st_size, CFG.max_upload_bytes, name)  # before reading it into memory
        return decode_image(file.read_bytes(), max_bytes=CFG.max_upload_bytes, max_pixels=CFG.max_pixels, name=name)

    @staticmethod
    def _rejected(exc: RequestRejected) -> JSONResponse:
        metrics.BAD_INPUT.labels(reason=exc.code).inc()
        return error_response(exc.code, exc.detail, exc.status)


Detector.add_asgi_middleware(RequestGuard, upload_limits={
    "/detect": CFG.max_upload_bytes, "/render": CFG.max_upload_bytes, "/detect_async/submit": CFG.max_upload_bytes,
    "/detect_batch": CFG.max_upload_bytes * CFG.max_batch_images})
