"""Asynchronous prediction logging for the serving path.

`PredictionLogger.log` only enqueues and returns: features are computed and written by one background
thread in small batches. A full queue drops the record (counted), a failing store is logged and
counted; neither ever raises into the request.

The image features depend on the pixels only, so the logger keeps those of the last images it saw by
SHA-256: an image sent again (a result-cache hit, which the service answers without decoding) is
logged with the same features at no cost; its pixels are produced (decoded) on the logger's thread
only when they were forgotten. Readers of the log (drift, the deployment's shadow check) call
`flush()` first, or wait for the server's next flush (every `flush_interval_s`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prometheus_client import Counter

from monitoring.features import detection_summary, image_embedding, image_statistics
from monitoring.store import PredictionRecord, PredictionStore, open_store
from pipelines.types import Detection

log = logging.getLogger(__name__)

LOG_FAILURES = Counter("detops_prediction_log_failures_total",
                       "Prediction records lost because featurizing or writing them failed")
LOG_DROPPED = Counter("detops_prediction_log_dropped_total",
                      "Prediction records dropped because the logging queue was full")
LOG_WRITTEN = Counter("detops_prediction_log_written_total", "Prediction records written to the store")


@dataclass(frozen=True)
class _Item:
    ts: datetime
    image: np.ndarray | Callable[[], np.ndarray]  # the pixels, or how to get them (decode) if needed
    sha256: str
    request_id: str
    detections: tuple[Detection, ...]
    model_name: str
    model_version: str
    traffic: str
    tenant: str


def encode_detections(detections: Sequence[Detection]) -> str:
    """Compact JSON of detections: `[[x1, y1, x2, y2, class_id, confidence], ...]`."""
    return json.dumps([[round(d.box.x1, 1), round(d.box.y1, 1), round(d.box.x2, 1), round(d.box.y2, 1),
                        d.class_id, round(d.confidence, 4)] for d in detections], separators=(",", ":"))


@dataclass(frozen=True)
class ImageFeatures:
    """What the log records about the pixels of an image (the same for every request sending it)."""

    width: int
    height: int
    statistics: dict[str, float]
    embedding: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray) -> ImageFeatures:
        """Featurize an RGB uint8 image."""
        h, w = image.shape[:2]
        return cls(w, h, image_statistics(image), image_embedding(image))


def make_record(image: np.ndarray | ImageFeatures, *, sha256: str, request_id: str, detections: Sequence[Detection],
                class_names: Sequence[str], model_name: str, model_version: str,
                ts: datetime | None = None, image_path: str | None = None, traffic: str = "live",
                tenant: str = "-") -> PredictionRecord:
    """Featurize one prediction into a record (used by the logger and by the reference profile);
    `image` is the RGB image or its features, already computed."""
    features = image if isinstance(image, ImageFeatures) else ImageFeatures.of(image)
    w, h = features.width, features.height
    return PredictionRecord(
        ts=ts or datetime.now(timezone.utc), request_id=request_id, image_sha256=sha256, width=w, height=h,
        statistics=dict(features.statistics), summary=detection_summary(detections, class_names, (w, h)),
        embedding=features.embedding.copy(), model_name=model_name, model_version=model_version,
        detections=encode_detections(detections), image_path=image_path, traffic=traffic, tenant=tenant)


class PredictionLogger:
    """Log predictions to a store without slowing the request down.

    `store_location` is a folder (see `open_store`) or a ready `PredictionStore`. The caller must not
    modify an image after passing it to `log` (it is featurized later, on the logger's thread).
    `remember` is how many images' features are kept by SHA-256 (0: none).
    """

    def __init__(self, store_location: str | Path | PredictionStore, *, class_names: Sequence[str],
                 keep_images: bool = False, max_queue: int = 1000, batch_size: int = 32,
                 flush_interval_s: float = 0.5, remember: int = 1024) -> None:
        self.store = store_location if isinstance(store_location, PredictionStore) else open_store(store_location)
        self.class_names = list(class_names)
        self.keep_images = keep_images
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.dropped = 0
        self.failures = 0
        self.written = 0
        self.remember = remember
        self._features: OrderedDict[str, ImageFeatures] = OrderedDict()  # only the logger's thread uses it
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="detops-prediction-logger", daemon=True)
        self._thread.start()

    def log(self, image_rgb: np.ndarray | Callable[[], np.ndarray], *, sha256: str, request_id: str,
            detections: Sequence[Detection], model_name: str, model_version: str, traffic: str = "live",
            tenant: str = "-") -> bool:
        """Enqueue one prediction; returns False (and counts it) when it was dropped. Never raises.
        `image_rgb` may be a function returning the pixels: called on the logger's thread, and only when
        the features of `sha256` are not remembered (or `keep_images` needs the pixels)."""
        try:
            if self._closed:
                raise RuntimeError("logger is closed")
            self._queue.put_nowait(_Item(datetime.now(timezone.utc), image_rgb, sha256, request_id,
                                         tuple(detections), model_name, model_version, traffic, tenant))
            return True
        except queue.Full:
            self.dropped += 1
            LOG_DROPPED.inc()
        except Exception:  # the request must never fail because of logging
            log.exception("prediction log: cannot enqueue")
            self.failures += 1
            LOG_FAILURES.inc()
        return False

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every enqueued record has been written (or failed)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush and stop the background thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[_Item] = []
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.task_done()
                    stop = True
                    break
                batch.append(item)
            if batch:
                self._write(batch)
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[_Item]) -> None:
        records = []
        for item in batch:
            try:
                image = item.image
                if self.keep_images:
                    image = image if isinstance(image, np.ndarray) else image()
                path = self.store.save_image(item.sha256, image) if self.keep_images else None
                records.append(make_record(self._featurize(item.sha256, image), sha256=item.sha256, request_id=item.request_id,
                                           detections=item.detections, class_names=self.class_names,
                                           model_name=item.model_name, model_version=item.model_version,
                                           ts=item.ts, image_path=path, traffic=item.traffic, tenant=item.tenant))
            except Exception:
                log.exception("prediction log: cannot featurize request %s", item.request_id)
                self.failures += 1
                LOG_FAILURES.inc()
        try:
            self.store.append(records)
            self.written += len(records)
            LOG_WRITTEN.inc(len(records))
        except Exception:
            log.exception("prediction log: store failed, %d records lost", len(records))
            self.failures += len(records)
            LOG_FAILURES.inc(len(records))

    def _featurize(self, sha256: str, image: np.ndarray | Callable[[], np.ndarray]) -> ImageFeatures:
        """The image's features: remembered by SHA-256, else computed (producing the pixels if needed)."""
        features = self._features.get(sha256)
        if features is not None:
            self._features.move_to_end(sha256)
            return features
        features = ImageFeatures.of(image if isinstance(image, np.ndarray) else image())
        if self.remember:
            self._features[sha256] = features
            while len(self._features) > self.remember:
                self._features.popitem(last=False)
        return features
