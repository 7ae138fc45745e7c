"""Asynchronous prediction logging for the serving path.

`PredictionLogger.log` only enqueues and returns: features are computed and written in small batches
by a separate featurizer PROCESS (multiprocessing 'spawn'), started at a lower CPU priority
(`os.nice`), so that under load inference wins the cores and the featurization takes what is left
(the featurization was a third of the serving workers' CPU when it ran on a thread of theirs,
docs/performance.md). The queue between them is bounded: a full queue drops the record (counted), a
failing store is logged and counted; neither ever raises into the request.

The image features depend on the pixels only, so the featurizer keeps those of the last images it saw
by SHA-256: an image sent again (a result-cache hit, which the service answers without decoding) is
logged with the same features at no cost; its pixels are produced (decoded) in the featurizer only
when they were forgotten. Readers of the log (drift, the deployment's shadow check) call `flush()`
first (it waits until the featurizer has written everything enqueued), or wait for the server's next
flush (every `flush_interval_s`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge

from monitoring.features import detection_summary, image_features
from monitoring.store import PredictionRecord, PredictionStore, open_store
from pipelines.types import Detection

log = logging.getLogger(__name__)

LOG_FAILURES = Counter("detops_prediction_log_failures_total",
                       "Prediction records lost because featurizing or writing them failed")
LOG_DROPPED = Counter("detops_prediction_log_dropped_total",
                      "Prediction records dropped because the logging queue was full")
LOG_WRITTEN = Counter("detops_prediction_log_written_total", "Prediction records written to the store")
# What a load leaves behind: work the requests were answered without (a bench or a capacity test waits
# for 0 before its next phase; a backlog that keeps growing ends in drops).
LOG_BACKLOG = Gauge("detops_prediction_log_backlog",
                    "Prediction records enqueued and not yet written (or failed) by the featurizer",
                    multiprocess_mode="livesum")


@dataclass(frozen=True)
class _Item:
    ts: datetime
    # The pixels, or how to get them (decode) if needed: a picklable callable, run in the featurizer.
    image: np.ndarray | Callable[[], np.ndarray]
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
        return cls(w, h, *image_features(image))


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


class _Queue(multiprocessing.queues.Queue):
    """The bounded queue to the featurizer; an item its feeder thread cannot pickle is counted as
    lost (else `flush` would wait for it)."""

    def __init__(self, maxsize: int, ctx) -> None:  # noqa: ANN001
        super().__init__(maxsize, ctx=ctx)
        self.unsent = 0

    def _on_queue_feeder_error(self, e: Exception, obj: object) -> None:
        log.error("prediction log: cannot send an item to the featurizer (%s: %s)", type(e).__name__, e)
        self.unsent += 1
        LOG_FAILURES.inc()


# Slots of the featurizer's shared counters (written by the featurizer only, read by the logger).
_PROCESSED, _WRITTEN, _FAILED = range(3)


class PredictionLogger:
    """Log predictions to a store without slowing the request down, nor taking its CPU.

    `store_location` is a folder (see `open_store`) or a ready, picklable `PredictionStore` (it is
    sent to the featurizer process). The caller must not modify an image after passing it to `log`.
    `remember` is how many images' features are kept by SHA-256 (0: none). `niceness` is added to the
    featurizer process's nice value (lower priority than the serving worker that owns it).
    """

    def __init__(self, store_location: str | Path | PredictionStore, *, class_names: Sequence[str],
                 keep_images: bool = False, max_queue: int = 1000, batch_size: int = 32,
                 flush_interval_s: float = 0.5, remember: int = 1024, niceness: int = 10) -> None:
        # Opened here too, so that a bad location fails the caller at once, not the featurizer later.
        self.store = store_location if isinstance(store_location, PredictionStore) else open_store(store_location)
        self.class_names = list(class_names)
        self.keep_images = keep_images
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.remember = remember
        self.dropped = 0
        self._enqueue_failures = 0
        self._enqueued = 0
        self._reported = [0, 0]  # written, featurizer failures already added to the Prometheus counters
        self._report_lock = threading.Lock()
        self._closed = False
        # 'spawn': a fresh interpreter, never a fork of a serving worker's threads (onnxruntime, asyncio).
        ctx = multiprocessing.get_context("spawn")
        self._queue = _Queue(max_queue, ctx)
        self._counters = ctx.RawArray("q", 3)  # single writer (the featurizer): no lock needed
        self._process = ctx.Process(
            target=_featurizer_main, name="detops-featurizer", daemon=True,
            args=(self._queue, self._counters, self.store, self.class_names, keep_images, batch_size,
                  flush_interval_s, remember, niceness))
        self._process.start()
        # The counters and the backlog move after the last request too (the featurizer catches up).
        threading.Thread(target=self._report_every, name="detops-log-report", daemon=True).start()

    @property
    def backlog(self) -> int:
        """Records enqueued and not yet written or failed: work deferred past the requests that made it."""
        return max(self._enqueued - int(self._counters[_PROCESSED]) - self._queue.unsent, 0)

    @property
    def written(self) -> int:
        """Records written to the store so far."""
        return int(self._counters[_WRITTEN])

    @property
    def failures(self) -> int:
        """Records lost: not enqueued (logger closed, bad item) or not featurized/written."""
        return self._enqueue_failures + self._queue.unsent + int(self._counters[_FAILED])

    def log(self, image_rgb: np.ndarray | Callable[[], np.ndarray], *, sha256: str, request_id: str,
            detections: Sequence[Detection], model_name: str, model_version: str, traffic: str = "live",
            tenant: str = "-") -> bool:
        """Enqueue one prediction; returns False (and counts it) when it was dropped. Never raises.
        `image_rgb` may be a picklable function returning the pixels (a module-level function or a
        `functools.partial` of one, e.g. over the encoded bytes): called in the featurizer, and only
        when the features of `sha256` are not remembered (or `keep_images` needs the pixels)."""
        self._report()
        try:
            if self._closed:
                raise RuntimeError("logger is closed")
            # A plain tuple, the fields of _Item: the queue's feeder thread pickles it.
            self._queue.put_nowait((datetime.now(timezone.utc), image_rgb, sha256, request_id, tuple(detections),
                                    model_name, model_version, traffic, tenant))
            self._enqueued += 1
            return True
        except queue.Full:
            self.dropped += 1
            LOG_DROPPED.inc()
        except Exception:  # the request must never fail because of logging
            log.exception("prediction log: cannot enqueue")
            self._enqueue_failures += 1
            LOG_FAILURES.inc()
        return False

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every enqueued record has been written (or failed), at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.backlog and self._process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._report()

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush and stop the featurizer process."""
        if self._closed:
            return
        self._closed = True
        if self._process.is_alive():
            try:
                self._queue.put(None, timeout=timeout_s)  # after everything enqueued: written first
            except queue.Full:
                log.error("prediction log: the featurizer does not drain its queue; stopping it")
            self._process.join(timeout_s)
        if self._process.is_alive():
            log.error("prediction log: the featurizer did not stop within %.0f s; terminated", timeout_s)
            self._process.terminate()
            self._process.join(5)
        if self.backlog:
            self._queue.cancel_join_thread()  # nobody reads what is left: do not block on it
        self._queue.close()
        self._report()

    def _report(self) -> None:
        """Add what the featurizer wrote or lost since last time to this process's Prometheus counters
        (the featurizer's own registry is not scraped), and set the backlog gauge."""
        with self._report_lock:
            written, failed = int(self._counters[_WRITTEN]), int(self._counters[_FAILED])
            if written > self._reported[0]:
                LOG_WRITTEN.inc(written - self._reported[0])
            if failed > self._reported[1]:
                LOG_FAILURES.inc(failed - self._reported[1])
            self._reported = [written, failed]
            LOG_BACKLOG.set(self.backlog if not self._closed else 0)

    def _report_every(self) -> None:
        while not self._closed:
            self._report()
            time.sleep(self.flush_interval_s)


class _Featurizer:
    """The featurizer process's state: the store, the remembered features, the counters."""

    def __init__(self, store: PredictionStore, counters, class_names: list[str], keep_images: bool,  # noqa: ANN001
                 remember: int) -> None:
        self.store = store
        self.counters = counters
        self.class_names = class_names
        self.keep_images = keep_images
        self.remember = remember
        self._features: OrderedDict[str, ImageFeatures] = OrderedDict()

    def write(self, batch: list[_Item]) -> None:
        """Featurize and append one batch; count what was written and lost."""
        records = []
        for item in batch:
            try:
                image = item.image
                if self.keep_images:
                    image = image if isinstance(image, np.ndarray) else image()
                path = self.store.save_image(item.sha256, image) if self.keep_images else None
                records.append(make_record(self._featurize(item.sha256, image), sha256=item.sha256,
                                           request_id=item.request_id, detections=item.detections,
                                           class_names=self.class_names, model_name=item.model_name,
                                           model_version=item.model_version, ts=item.ts, image_path=path,
                                           traffic=item.traffic, tenant=item.tenant))
            except Exception:
                log.exception("prediction log: cannot featurize request %s", item.request_id)
                self.counters[_FAILED] += 1
        try:
            self.store.append(records)
            self.counters[_WRITTEN] += len(records)
        except Exception:
            log.exception("prediction log: store failed, %d records lost", len(records))
            self.counters[_FAILED] += len(records)

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


def _featurizer_main(items, counters, store: PredictionStore, class_names: list[str], keep_images: bool,  # noqa: ANN001
                     batch_size: int, flush_interval_s: float, remember: int, niceness: int) -> None:
    """The featurizer process: batches of items from the queue until None; every item taken is
    counted as processed once its batch is written (or lost), which is what `flush` waits for."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s featurizer: %(message)s")
    if niceness:
        try:
            os.nice(niceness)
        except OSError:  # not allowed here: run at the worker's priority rather than not at all
            log.warning("prediction log: cannot lower the featurizer's priority")
    # Ctrl-C reaches the whole process group: the worker's close() stops this process once it has
    # written what is queued; an interrupt here would lose it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    featurizer = _Featurizer(store, counters, class_names, keep_images, remember)
    parent = multiprocessing.parent_process()
    stop = False
    while not stop:
        # A worker killed outright (SIGKILL, OOM) never sends None: do not outlive it as an orphan.
        stop = parent is not None and not parent.is_alive()
        batch: list[_Item] = []
        taken = 0
        deadline = time.monotonic() + flush_interval_s
        while len(batch) < batch_size and not stop:
            try:
                raw = items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            except Exception:  # an item that cannot be unpickled (its callable's module is missing, ...)
                log.exception("prediction log: cannot receive an item")
                counters[_FAILED] += 1
                counters[_PROCESSED] += 1
                continue
            if raw is None:
                stop = True
                break
            batch.append(_Item(*raw))
            taken += 1
        if batch:
            featurizer.write(batch)
            counters[_PROCESSED] += taken
