"""Section of detection jobs: `POST /jobs`, the Celery workers, webhooks and `detops batch`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from pipelines.config.base import Section


class JobsConfig(Section):
    """Durable detection jobs (serving/jobs/). Server URLs and the webhook secret never live here:
    they come from DETOPS_DATABASE_URL, DETOPS_BROKER_URL, DETOPS_OBJECT_STORE_URL and
    DETOPS_WEBHOOK_SECRET (serving/jobs/settings.py); every field below can be overridden by
    DETOPS_JOBS_<FIELD>."""

    section: ClassVar[str] = "jobs"

    data_dir: Path = Path("jobs_store")  # the embedded default's job database, broker file and image folder
    # Limits of one submission (checked before anything is stored: 4xx naming the limit).
    max_images_per_job: int = Field(5000, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_job_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    inline_results_max: int = Field(100, ge=0)  # GET /jobs/{id} embeds the results of jobs up to this size
    # Work: a job is processed in chunks, each one Celery task and one batched inference.
    queue: str = "detops-jobs"
    chunk_size: int = Field(64, ge=1)
    parallel_chunks: int = Field(4, ge=1)  # chunks of one job in flight at once (wake-ups published)
    chunk_time_limit_s: float = Field(300.0, gt=0)  # a chunk running longer is killed (its images retried)
    lease_slack_s: float = Field(30.0, gt=0)  # an image's lease lasts chunk_time_limit_s + this
    max_attempts: int = Field(3, ge=1)  # an image that crashed or timed out this often is dead-lettered
    # Transient failures (database, broker, object store, registry): Celery retries with backoff.
    max_retries: int = Field(8, ge=0)
    retry_backoff_s: int = Field(1, ge=1)  # whole seconds (Celery's backoff computes in integers)
    retry_backoff_max_s: int = Field(300, ge=1)
    # The workers' housekeeping thread: re-publish wake-ups of stalled jobs, heartbeat, webhooks.
    reap_interval_s: float = Field(5.0, gt=0)  # also how often each worker writes its heartbeat
    # A worker counts as alive (/readyz, /metrics, the 202 of POST /jobs) while its heartbeat is younger.
    worker_lease_s: float = Field(30.0, gt=0)
    # After SIGTERM a worker stops taking messages and lets its chunks finish for at most this long,
    # then kills its pool processes and exits (their images are re-claimed when their lease expires).
    shutdown_grace_s: float = Field(30.0, gt=0)
    requeue_after_s: float = Field(120.0, gt=0)  # a queued job untouched this long gets a new wake-up
    model_check_interval_s: float = Field(10.0, gt=0)  # how often a worker asks which version is live
    worker_concurrency: int | None = Field(None, ge=1)  # processes per worker (null: the machine's cores)
    worker_threads: int = Field(1, ge=1)  # ONNX Runtime threads per worker process
    # Webhooks (callback_url): signed with DETOPS_WEBHOOK_SECRET, retried with exponential backoff.
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_backoff_s: float = Field(2.0, gt=0)
    webhook_backoff_max_s: float = Field(600.0, gt=0)
    webhook_schemes: list[str] = ["https"]
    webhook_allowed_hosts: list[str] = []  # host patterns (fnmatch); empty: any public host
    webhook_allow_private: bool = False  # loopback, private, link-local addresses (local development only)
    retry_after_s: int = Field(5, ge=1)  # Retry-After of a 503 when the job store is unavailable
    db_connect_timeout_s: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> JobsConfig:
        if self.max_image_bytes > self.max_job_bytes:
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) is over max_job_bytes ({self.max_job_bytes})")
        if self.worker_lease_s < 2 * self.reap_interval_s:
            raise ValueError(f"worker_lease_s ({self.worker_lease_s}) must be at least twice reap_interval_s "
                             f"({self.reap_interval_s}), the heartbeat interval: one late heartbeat must not "
                             "count a live worker out")
        if not set(self.webhook_schemes) <= {"http", "https"} or not self.webhook_schemes:
            raise ValueError(f"webhook_schemes: only http and https (got {self.webhook_schemes})")
        return self

    @property
    def lease_s(self) -> float:
        """How long a claimed image belongs to its worker: longer than a chunk may run, so a live
        worker's lease never expires under it."""
        return self.chunk_time_limit_s + self.lease_slack_s
