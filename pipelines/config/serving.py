"""Sections of serving: the BentoML service and its load test."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from pipelines.config.base import Section


class ServeConfig(Section):
    """The BentoML service (serving/): model, batching, limits, cache, prediction log. Every field can
    be overridden by an environment variable DETOPS_SERVE_<FIELD> (serving/settings.py)."""

    section: ClassVar[str] = "serve"

    model_name: str = "detops-detector"
    alias: str = "champion"
    store_version: str = "latest"  # which version of the imported model the service serves
    workers: int = Field(2, ge=1)
    timeout_s: int = Field(60, ge=1)
    max_batch_size: int = Field(16, ge=1)
    max_latency_ms: int = Field(1000, ge=1)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_batch_images: int = Field(32, ge=1)
    cache_entries: int = Field(1024, ge=0)
    threads: int | None = Field(None, ge=1)  # ONNX Runtime intra-op threads; default: cores / workers
    prediction_log: Path = Path("monitoring_store")
    keep_images: bool = False
    # BentoML's OpenTelemetry middleware on the requests (exporter and sample rate: BentoML's own
    # configuration). Off, it lets every request through untouched: it traces nothing by default
    # but cost 14 % of a worker's Python time building spans (docs/performance.md).
    tracing: bool = False


class LoadTestConfig(Section):
    """`make loadtest`: Locust's load shape and the SLOs that set its exit code."""

    section: ClassVar[str] = "loadtest"

    model_dir: Path = Path("models")
    out: Path = Path("reports/load")
    users: int = Field(8, ge=1)
    spawn_rate: float = Field(4.0, gt=0)
    run_time: str = Field("30s", pattern=r"^\d+[smh]$")  # Locust's -t syntax
    max_p95_ms: float = Field(1500.0, gt=0)  # SLO: 95th percentile of every request's latency
    max_failure_ratio: float = Field(0.01, ge=0, le=1)  # SLO: failed / all requests
    batch_images: int = Field(4, ge=1)  # images per /detect_batch request
    synthetic_images: int = Field(32, ge=1)  # synthetic images rendered at start-up (no dataset folder)
    images: Path | None = None  # a folder of .jpg/.png images to send instead of the synthetic ones
    cache: bool = False  # keep the service's result cache on (repeated images then skip the model)
