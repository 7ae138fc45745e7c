"""Detection of a chunk of encoded images, as the job workers and `detops batch run` run it: each
image decoded and checked like an upload to /detect (a bad one fails alone with the same error
code), the good ones letterboxed together and run as one batch through the shared runtime's steps,
each post-processed with the job's thresholds into the `/detect` body."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from serving.imaging import DecodedImage, RequestRejected, decode_image
from serving.jobs.results import IMAGE_FAILED, IMAGE_SUCCEEDED, ImageResult
from serving.runtime import ModelRuntime, PredictParams
from serving.schemas import ModelInfo, detect_response

log = logging.getLogger(__name__)


def detect_encoded(runtime: ModelRuntime, payloads: Sequence[bytes], indices: Sequence[int], params: PredictParams,
                   model: ModelInfo, *, max_bytes: int, max_pixels: int) -> list[ImageResult]:
    """One ImageResult per payload, in order, each with its index from `indices`."""
    outcomes: dict[int, ImageResult] = {}
    good: list[tuple[int, DecodedImage]] = []
    for index, data in zip(indices, payloads):
        try:
            good.append((index, decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=f"image {index}")))
        except RequestRejected as exc:
            outcomes[index] = ImageResult(index, IMAGE_FAILED, error=exc.code, detail=exc.detail)
    try:
        detections = _predict(runtime, [d for _, d in good], params)
    except Exception:  # one image may break the batch: run each alone, so only that one fails
        log.exception("batch of %d images failed; retrying them one by one", len(good))
        detections = []
        for index, decoded in good:
            try:
                detections.append(_predict(runtime, [decoded], params)[0])
            except Exception as exc:
                log.exception("image %d failed alone", index)
                detections.append(None)
                detail = f"the model could not process this image ({type(exc).__name__}: {exc})"
                outcomes[index] = ImageResult(index, IMAGE_FAILED, error="inference_failed", detail=detail)
    for (index, decoded), dets in zip(good, detections):
        if dets is not None:
            body = detect_response(decoded.width, decoded.height, decoded.sha256, dets, runtime.class_names, model)
            outcomes[index] = ImageResult(index, IMAGE_SUCCEEDED, body=body)
    return [outcomes[i] for i in indices]


def _predict(runtime: ModelRuntime, images: Sequence[DecodedImage], params: PredictParams) -> list:
    if not images:
        return []
    boxed, metas = runtime.letterbox([d.rgb for d in images])
    return runtime.postprocess(runtime.infer(runtime.to_input(boxed)), metas, params)
