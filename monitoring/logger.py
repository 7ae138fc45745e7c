"""Asynchronous prediction logging for the serving path.

`PredictionLogger.log` only enqueues and returns: features are computed and written by one background
thread in small batches. A full queue drops the record (counted), a failing store is logged and
counted; neither ever raises into the request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
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
    image: np.ndarray
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


def make_record(image: np.ndarray, *, sha256: str, request_id: str, detections: Sequence[Detection],
                class_names: Sequence[str], model_name: str, model_version: str,
                ts: datetime | None = None, image_path: str | None = None, traffic: str = "live",
                tenant: str = "-") -> PredictionRecord:
    """Featurize one prediction into a record (used by the logger and by the reference profile)."""
    h, w = image.shape[:2]
    return PredictionRecord(
        ts=ts or datetime.now(timezone.utc), request_id=request_id, image_sha256=sha256, width=w, height=h,
        statistics=image_statistics(image), summary=detection_summary(detections, class_names, (w, h)),
        embedding=image_embedding(image), model_name=model_name, model_version=model_version,
        detections=encode_detections(detections), image_path=image_path, traffic=traffic, tenant=tenant)


class PredictionLogger:
    """Log predictions to a store without slowing the request down.

    `store_location` is a folder (see `open_store`) or a ready `PredictionStore`. The caller must not
    modify an image after passing it to `log` (it is featurized later, on the logger's thread).
    """

    def __init__(self, store_location: str | Path | PredictionStore, *, class_names: Sequence[str],
                 keep_images: bool = False, max_queue: int = 1000, batch_size: int = 32,
                 flush_interval_s: float = 0.5) -> None:
        self.store = store_location if isinstance(store_location, PredictionStore) else open_store(store_location)
        self.class_names = list(class_names)
        self.keep_images = keep_images
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.dropped = 0
        self.failures = 0
        self.written = 0
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="detops-prediction-logger", daemon=True)
        self._thread.start()

    def log(self, image_rgb: np.ndarray, *, sha256: str, request_id: str, detections: Sequence[Detection],
            model_name: str, model_version: str, traffic: str = "live", tenant: str = "-") -> bool:
        """Enqueue one prediction; returns False (and counts it) when it was dropped. Never raises."""
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
                path = self.store.save_image(item.sha256, item.image) if self.keep_images else None
                records.append(make_record(item.image, sha256=item.sha256, request_id=item.request_id,
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
