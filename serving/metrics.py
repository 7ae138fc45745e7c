"""The service's own Prometheus metrics, next to BentoML's on `/metrics`.

BentoML serves metrics in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set for
every worker before it imports anything), so metrics created here with the default registry are
collected from all workers. Import this module only in the serving process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import Route

from pipelines.types import Detection

UNMATCHED = "unmatched"

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


class RouteLabels:
    """The `endpoint` label of a request: the path of a route without parameters, the template of one
    with parameters (`/jobs/{job_id}`), `<prefix>{path}` under a static prefix, and `unmatched` for a
    path no route serves. Never the raw path: a label value per job id, or per URL a scanner tries, is
    a new time series in every worker, kept for the worker's life (the soak's RSS growth,
    docs/performance.md), and a longer /metrics at every scrape."""

    def __init__(self, paths: Iterable[str], apps: Iterable[Any], prefixes: Iterable[str] = ()) -> None:
        """`paths`: routes served as they are; `apps`: Starlette apps whose routes are added (their
        templates); `prefixes`: folders of files (`/static_content/`)."""
        routes = [route for app in apps for route in app.routes if isinstance(route, Route)]
        self.paths = frozenset(paths) | {route.path for route in routes if not route.param_convertors}
        self.prefixes = tuple(prefixes)
        self.templates = [(route.path_regex, route.path) for route in routes if route.param_convertors]

    def __call__(self, path: str) -> str:
        if path in self.paths:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return prefix + "{path}"
        return next((template for regex, template in self.templates if regex.match(path)), UNMATCHED)


def label_http_metrics_by_route(label: Callable[[str], str]) -> None:
    """Make BentoML's request metrics (`bentoml_service_request_*`, which deploy/k8s queries) label
    `endpoint` with `label(path)` instead of the raw path.

    BentoML offers no setting for it: its middleware is replaced, before the worker builds its app, by
    a subclass that hands it the label as the path while the app behind it gets the real one back.
    Call this at the service module's import (the worker imports it first)."""
    from bentoml._internal.server.http import instruments

    bentoml_metrics = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if bentoml_metrics is None:
        raise ImportError("bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware is gone: "
                          "this BentoML version is not the one serving/metrics.py was written for")
    if getattr(bentoml_metrics, "labels_routes", False):
        return
    real_path = "detops.real_path"

    class RouteLabelledMetrics(bentoml_metrics):
        labels_routes = True

        def __init__(self, app: Callable[..., Any], **options: Any) -> None:
            async def with_real_path(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
                if real_path in scope:
                    scope = {**scope, "path": scope[real_path]}
                await app(scope, receive, send)

            super().__init__(with_real_path, **options)

        async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
            if scope["type"] == "http":
                scope = {**scope, "path": label(scope["path"]), real_path: scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics
