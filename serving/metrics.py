"""The service's own Prometheus metrics, next to BentoML's on `/metrics`.

BentoML serves metrics in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set for
every worker before it imports anything), so metrics created here with the default registry are
collected from all workers. Import this module only in the serving process.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from pipelines.types import Detection

DETECTIONS_PER_IMAGE = Histogram(
    "detops_detections_per_image", "Detections returned per image",
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 50, 100, 300))
CONFIDENCE = Histogram(
    "detops_detection_confidence", "Calibrated confidence of returned detections",
    buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)))
MODEL_INFO = Gauge(
    "detops_model_info", "The model this service serves (value 1)",
    ["name", "version", "alias", "bento_tag"], multiprocess_mode="livemax")
CACHE = Counter("detops_cache_requests", "Result-cache lookups by outcome", ["result"])
BAD_INPUT = Counter("detops_bad_input", "Requests refused for bad input (4xx), by reason", ["reason"])
INFERENCE_ERRORS = Counter(
    "detops_inference_errors",
    "Requests answered 5xx (overloaded, inference_failed, internal_error), by reason", ["reason"])
RATE_LIMITS_FAIL_OPEN = Counter(
    "detops_rate_limits_fail_open",
    "Rate-limit or quota checks let through unenforced because the limits storage could not be reached")
INFERENCE_BATCH_SIZE = Histogram(
    "detops_inference_batch_size",
    "Images per ONNX Runtime call of the in-process batcher (one observation per batch)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128))


JOB_WORKERS = Gauge(
    "detops_job_workers_alive", "Job workers whose heartbeat is younger than jobs.worker_lease_s (0: no worker "
    "consumes POST /jobs)", multiprocess_mode="livemax")
OLDEST_QUEUED_JOB = Gauge(
    "detops_jobs_oldest_queued_age_seconds", "Age of the oldest job still queued (0: none queued)",
    multiprocess_mode="livemax")


def observe_job_consumers(alive: int, oldest_queued_age_s: float) -> None:
    """Record the last reading of the job workers' heartbeats (serving/gateway/readiness.py)."""
    JOB_WORKERS.set(alive)
    OLDEST_QUEUED_JOB.set(oldest_queued_age_s)


def observe_detections(detections: Sequence[Detection]) -> None:
    """Record one image's detections."""
    DETECTIONS_PER_IMAGE.observe(len(detections))
    for det in detections:
        CONFIDENCE.observe(det.confidence)
