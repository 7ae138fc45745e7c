"""Bodies of the job routes (their JSON schema is what /docs.json shows) and the job summary, which
`GET /jobs/{id}` answers and a webhook delivers."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from serving.jobs.results import result_line
from serving.jobs.store import FINISHED, Counts, JobRecord, JobStore, ResultRecord

JobStatusName = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
STATUS_DESCRIPTION = ("queued, running; then succeeded (every image succeeded), partial (some images failed or "
                      "were dead-lettered: see errors), failed (no image succeeded, or the job could not run: see "
                      "error) or cancelled")


class JobAccepted(BaseModel):
    job_id: str = Field(examples=["3f2b9c0e5d8a4c1b9e7f6a5d4c3b2a10"])
    status_url: str = Field(description="poll this: GET /jobs/{job_id}",
                            examples=["/jobs/3f2b9c0e5d8a4c1b9e7f6a5d4c3b2a10"])
    results_url: str = Field(description="GET for JSON Lines, ?format=coco for COCO results")
    workers_alive: int | None = Field(
        None, description="job workers whose heartbeat is younger than jobs.worker_lease_s, as the service last "
                          "read it (every gateway.dependency_check_s; also header X-Job-Workers); 0: the job is "
                          "stored but no worker is consuming, it waits until one starts; null: not known")
    warning: str | None = Field(None, description="why the job may not start soon (no worker is consuming)")


class JobCounts(BaseModel):
    total: int = Field(description="images submitted")
    succeeded: int = Field(description="images whose detection succeeded (their detections may be empty)")
    failed: int = Field(description="images that could not be processed (each has its error), dead letters included")
    dead_lettered: int = Field(description="images that crashed or timed out a worker jobs.max_attempts times")
    pending: int = Field(description="images not processed yet")


class ImageError(BaseModel):
    index: int = Field(description="position of the image in the submission")
    name: str = Field(description="the image's name as submitted")
    error: str = Field(examples=["corrupt_image"])
    detail: str


class JobModel(BaseModel):
    name: str | None = Field(None, examples=["detops-detector"])
    version: str | None = Field(None, description="registry version that produced the results", examples=["3"])


class WebhookState(BaseModel):
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None = None


class JobSummary(BaseModel):
    job_id: str
    status: JobStatusName = Field(description=STATUS_DESCRIPTION)
    counts: JobCounts
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deleted: bool = Field(False, description="DELETE /jobs/{id} removed its images and results")
    model: JobModel
    error: str | None = Field(None, description="why the job is failed or partial, when it is")
    errors: list[ImageError] = Field(default_factory=list, description="the images that failed, with their errors")
    webhook: WebhookState | None = None
    results_url: str
    results: list[dict[str, Any]] | None = Field(
        None, description="when the job is finished and has at most jobs.inline_results_max images: one "
                          "record per image in submission order (index, name, status, then the /detect body or "
                          "error and detail); otherwise read results_url")


def _utc(moment: datetime | None) -> datetime | None:
    """Stored naive UTC -> aware (serialized with its offset)."""
    return None if moment is None else moment.replace(tzinfo=timezone.utc)


def results_url(job_id: str) -> str:
    return f"/jobs/{job_id}/results"


def record_line(record: ResultRecord) -> dict[str, Any]:
    """The JSON Lines record of one processed image of a job."""
    return result_line({"index": record.index, "name": record.name}, record.status, record.body, record.error,
                       record.detail)


def job_summary(store: JobStore, job: JobRecord, *, inline_results_max: int = 0) -> JobSummary:
    """The summary of a job as stored now (results inlined for a small finished job)."""
    counts: Counts = store.counts(job.job_id)
    failed = store.results(job.job_id, failed_only=True) if counts.failed + counts.dead else []
    finished = job.status in FINISHED
    inline = None
    if finished and job.deleted_at is None and job.total <= inline_results_max:
        inline = [record_line(r) for r in store.results(job.job_id)]
    return JobSummary(
        job_id=job.job_id, status=job.status,  # type: ignore[arg-type]
        counts=JobCounts(total=counts.total, succeeded=counts.succeeded, failed=counts.failed + counts.dead,
                         dead_lettered=counts.dead, pending=max(0, counts.total - counts.processed)),
        created_at=_utc(job.created_at), started_at=_utc(job.started_at), finished_at=_utc(job.finished_at),
        deleted=job.deleted_at is not None, model=JobModel(name=job.model_name, version=job.model_version),
        error=job.error,
        errors=[ImageError(index=r.index, name=r.name, error=r.error or "", detail=r.detail or "") for r in failed],
        webhook=(WebhookState(state=job.webhook_state, attempts=job.webhook_attempts,  # type: ignore[arg-type]
                              last_error=job.webhook_error) if job.webhook_state else None),
        results_url=results_url(job.job_id), results=inline)
