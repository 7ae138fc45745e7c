"""The job routes, a FastAPI app mounted on the BentoML service (serving/service.py), so they share
its port, its middleware and its OpenAPI document (/docs.json):

- `POST /jobs`: images as multipart files (`images`, repeated) or JSON (`{"images": [{"name", "data":
  base64}]}`), detection parameters, an optional `callback_url`, an optional `Idempotency-Key`
  header. Limits are checked first (4xx naming the limit); then the images go to the object store,
  the job and its image rows are committed in one transaction, and only then are the wake-ups
  published and 202 answered. A database that cannot be reached is a 503 with Retry-After and leaves
  nothing behind; a broker that cannot be reached is logged only (the job is stored: the workers'
  reaper publishes it later). With no live job worker the job is still accepted (it is durable), and
  the 202 says so (`workers_alive: 0`, `warning`, header `X-Job-Workers`).
- `GET /jobs/{id}`: the job summary (serving/jobs/schemas.py);
- `GET /jobs/{id}/results`: JSON Lines (default) or `?format=coco`; `?from_index=N` for the images
  from N on (a client reads a running job's results as they come);
- `DELETE /jobs/{id}`: cancels a queued or running job and deletes its images and results.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import JSONResponse, Response, StreamingResponse

from pipelines.config.jobs import JobsConfig
from serving import gateway
from serving.gateway.context import current_tenant
from serving.imaging import RequestRejected
from serving.jobs import queue, schemas
from serving.jobs.objects import ObjectStore, open_object_store
from serving.jobs.results import coco_results
from serving.jobs.settings import JobsSettings, load_jobs_settings
from serving.jobs.store import IdempotencyConflict, JobRecord, JobStore, NewImage, NewJob, StoreUnavailable
from serving.jobs.webhooks import CallbackRefused, check_callback_url
from serving.schemas import ErrorBody, error_response

log = logging.getLogger(__name__)
RESULTS_PAGE = 500  # rows read from the store per page while streaming results
FORM_FIELDS = ("images", "conf", "iou", "max_det", "classes", "callback_url")

app = FastAPI(title="detops jobs", openapi_url=None, docs_url=None, redoc_url=None)


def body_limit(cfg: JobsConfig) -> int:
    """The largest POST /jobs body: the job's bytes as base64 (JSON), plus room for the envelope."""
    return cfg.max_job_bytes * 4 // 3 + 4096 * cfg.max_images_per_job + 1024 * 1024


# --------------------------------------------------------------------------- request models
class JobOptions(BaseModel):
    """Detection parameters of a job (defaults: the model card's) and its callback."""

    model_config = ConfigDict(extra="forbid")

    conf: float | None = Field(None, ge=0, le=1, description="minimum calibrated confidence")
    iou: float | None = Field(None, gt=0, le=1, description="NMS IoU threshold")
    max_det: int | None = Field(None, ge=1, description="most detections per image")
    classes: list[int] | None = Field(None, description="keep only these class ids")
    callback_url: str | None = Field(None, description="receives a signed POST with the job summary when it finishes")


class JsonImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1024, description="the image's name, echoed in its results")
    data: str = Field(description="the file's bytes, base64")


class JsonSubmission(JobOptions):
    images: list[JsonImage] = Field(description="the images, in the order of the results")


SUBMIT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "the image files (repeat the field), in the order of the results"},
        "conf": {"type": "number", "minimum": 0, "maximum": 1}, "iou": {"type": "number", "maximum": 1},
        "max_det": {"type": "integer", "minimum": 1},
        "classes": {"type": "string", "description": "JSON list of class ids, e.g. [0, 2]"},
        "callback_url": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "object", "required": ["name", "data"], "properties": {
            "name": {"type": "string"}, "data": {"type": "string", "format": "byte"}}}},
        "conf": {"type": "number", "minimum": 0, "maximum": 1}, "iou": {"type": "number", "maximum": 1},
        "max_det": {"type": "integer", "minimum": 1}, "classes": {"type": "array", "items": {"type": "integer"}},
        "callback_url": {"type": "string"}}}},
}}}
ERRORS = {status: {"model": ErrorBody, "description": what} for status, what in {
    400: "bad request (the detail names the field)", 404: "no such job",
    409: "Idempotency-Key reused with another body",
    410: "the job was deleted", 413: "over a limit (the detail names it)", 422: "a value refused (the detail says why)",
    503: "the job store is unavailable: retry after Retry-After seconds"}.items()}


# --------------------------------------------------------------------------- state
@dataclass
class Backend:
    settings: JobsSettings
    store: JobStore
    objects: ObjectStore
    celery: Any
    schema_ready: bool = False


_backend: Backend | None = None
_backend_lock = threading.Lock()


def backend() -> Backend:
    """This process's job store, object store and publisher (created on first use; the schema is
    created on the first request that reaches the database)."""
    global _backend
    with _backend_lock:
        if _backend is None:
            settings = load_jobs_settings()
            store = JobStore(settings.database_url, connect_timeout_s=settings.config.db_connect_timeout_s)
            _backend = Backend(settings=settings, store=store, objects=open_object_store(settings.object_store_url),
                               celery=queue.make_app(settings))
        if not _backend.schema_ready:
            _backend.store.create_schema()  # StoreUnavailable -> 503, and the next request tries again
            _backend.schema_ready = True
        return _backend


# --------------------------------------------------------------------------- errors
@app.exception_handler(RequestRejected)
async def _rejected(_request: Request, exc: RequestRejected) -> JSONResponse:
    return error_response(exc.code, exc.detail, exc.status, retry_after=exc.retry_after)


@app.exception_handler(StoreUnavailable)
async def _store_down(_request: Request, exc: StoreUnavailable) -> JSONResponse:
    response = error_response("job_store_unavailable", f"{exc}; nothing was stored, retry later", 503)
    config = _backend.settings.config if _backend is not None else load_jobs_settings().config
    response.headers["Retry-After"] = str(config.retry_after_s)
    return response


@app.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response("invalid_parameter", _problems(exc.errors()), 400)


def _problems(errors: Any) -> str:
    """Pydantic's errors as `field: message; ...`."""
    def where(e: Any) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "header")) or "request"

    return "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in errors)


# --------------------------------------------------------------------------- submission
@dataclass
class Submission:
    images: list[tuple[str, bytes]]
    options: JobOptions


@app.post("/jobs", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS, openapi_extra=SUBMIT_BODY,
          summary="Submit a detection job", tags=["Jobs"])
async def submit_job(request: Request, idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", max_length=255,
        description="the same key with the same body returns the same job; with another body, 409")) -> Response:
    """Accept one or many images as a durable job: 202 once the job and its images are stored."""
    cfg = backend().settings.config
    limited = Request(request.scope, _limited_receive(request.receive, body_limit(cfg)))
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        submission = await _read_multipart(limited, cfg)
    elif content_type.startswith("application/json"):
        submission = await _read_json(limited, cfg)
    else:
        raise RequestRejected("invalid_parameter", "expected multipart/form-data (field images) or application/json "
                              f"({{\"images\": [{{\"name\", \"data\"}}]}}), got {content_type or 'no content type'!r}",
                              400)
    _check_limits(submission, cfg)
    _check_tenant_limits(len(submission.images))
    if submission.options.callback_url is not None:
        await run_in_threadpool(_check_callback, submission.options.callback_url, backend().settings)
    job, replayed = await run_in_threadpool(_accept, backend(), submission, idempotency_key, current_tenant())
    monitor = gateway.current().monitor
    consumers = monitor.consumers if monitor is not None else None
    alive = consumers.alive if consumers is not None else None
    body = schemas.JobAccepted(job_id=job.job_id, status_url=f"/jobs/{job.job_id}",
                               results_url=schemas.results_url(job.job_id), workers_alive=alive,
                               warning=consumers.detail if consumers is not None and consumers.none_alive else None)
    headers = {"Location": body.status_url}
    if alive is not None:
        headers["X-Job-Workers"] = str(alive)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body.model_dump(), status_code=202, headers=headers)


class _BodyTooLarge(Exception):
    pass


def _limited_receive(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """`receive` that stops a body growing past `limit` bytes (chunked uploads carry no length)."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _BodyTooLarge()
        return message

    return wrapped


def _too_large(cfg: JobsConfig) -> RequestRejected:
    return RequestRejected("job_too_large", f"the request body is over the limit for a job ({cfg.max_job_bytes} bytes "
                           "of images, jobs.max_job_bytes)", 413)


async def _read_multipart(request: Request, cfg: JobsConfig) -> Submission:
    try:
        form = await request.form(max_files=cfg.max_images_per_job, max_fields=len(FORM_FIELDS) + 1)
    except _BodyTooLarge:
        raise _too_large(cfg) from None
    except (MultiPartException, HTTPException) as exc:  # Starlette turns the first into the second
        message = getattr(exc, "detail", None) or str(exc)
        if "too many files" in message.lower():
            raise RequestRejected("too_many_images", f"more than {cfg.max_images_per_job} images in one job "
                                  "(jobs.max_images_per_job)", 413) from None
        raise RequestRejected("invalid_parameter", f"malformed multipart body ({message})", 400) from None
    try:
        unknown = sorted(set(form) - set(FORM_FIELDS))
        if unknown:
            raise RequestRejected("invalid_parameter",
                                  f"unknown fields {unknown} (expected: {', '.join(FORM_FIELDS)})", 400)
        files = form.getlist("images")
        if any(not isinstance(f, UploadFile) for f in files):
            raise RequestRejected("invalid_parameter", "images: expected uploaded files, got a text value", 400)
        values: dict[str, Any] = {}
        for key in FORM_FIELDS[1:]:
            if key in form:
                value = form[key]
                if isinstance(value, UploadFile):
                    raise RequestRejected("invalid_parameter", f"{key}: expected a value, got a file", 400)
                values[key] = _json_or_text(value) if key == "classes" else value
        options = _options(values)
        _check_count(len(files), cfg)
        images = []
        for i, upload in enumerate(files):
            if upload.size is not None:
                _check_image_size(upload.size, i, upload.filename, cfg)
            images.append((upload.filename or f"image-{i}", await upload.read()))
        return Submission(images=images, options=options)
    finally:
        await form.close()


async def _read_json(request: Request, cfg: JobsConfig) -> Submission:
    try:
        raw = await request.body()
    except _BodyTooLarge:
        raise _too_large(cfg) from None
    try:
        parsed = JsonSubmission.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestRejected("invalid_parameter", _problems(exc.errors()), 400) from None
    _check_count(len(parsed.images), cfg)
    images = []
    for i, item in enumerate(parsed.images):
        try:
            data = base64.b64decode(item.data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestRejected("invalid_parameter", f"images[{i}].data: not valid base64", 400) from None
        _check_image_size(len(data), i, item.name, cfg)
        images.append((item.name, data))
    return Submission(images=images, options=JobOptions.model_validate(parsed.model_dump(exclude={"images"})))


def _json_or_text(value: str) -> Any:
    """A form value that holds JSON (`classes=[0, 2]`); text that is not JSON stays text, so the model's
    validation names the field instead of the parser failing."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _options(values: dict[str, Any]) -> JobOptions:
    try:
        return JobOptions.model_validate(values)
    except ValidationError as exc:
        raise RequestRejected("invalid_parameter", _problems(exc.errors()), 400) from None


def _check_count(n: int, cfg: JobsConfig) -> None:
    if n == 0:
        raise RequestRejected("missing_field", "images: a job needs at least one image", 400)
    if n > cfg.max_images_per_job:
        raise RequestRejected("too_many_images", f"{n} images is over the limit of {cfg.max_images_per_job} per job "
                              "(jobs.max_images_per_job)", 413)


def _check_image_size(size: int, index: int, name: str | None, cfg: JobsConfig) -> None:
    if size > cfg.max_image_bytes:
        raise RequestRejected("image_too_large", f"images[{index}] ({name}): {size} bytes is over the limit of "
                              f"{cfg.max_image_bytes} bytes per image (jobs.max_image_bytes)", 413)


def _check_limits(submission: Submission, cfg: JobsConfig) -> None:
    total = sum(len(data) for _, data in submission.images)
    if total > cfg.max_job_bytes:
        raise RequestRejected("job_too_large", f"{total} bytes of images is over the limit of {cfg.max_job_bytes} "
                              "bytes per job (jobs.max_job_bytes)", 413)


def _check_tenant_limits(n: int) -> None:
    """The tenant's job size and daily image quota (serving/gateway/limits.py)."""
    tenant = current_tenant()
    limits = gateway.current().limits
    limits.job_size(tenant, n)
    limits.images_today(tenant, n)


def _check_callback(url: str, settings: JobsSettings) -> None:
    if not settings.webhook_secret:
        raise RequestRejected("webhooks_disabled", "callback_url: webhooks need DETOPS_WEBHOOK_SECRET on the "
                              "service and the workers (callbacks are always signed)", 422)
    try:
        check_callback_url(url, settings.config)
    except CallbackRefused as exc:
        raise RequestRejected("callback_url_refused", str(exc), 422) from None


def request_hash(submission: Submission) -> str:
    """What makes two submissions the same request: parameters, callback, images' names and bytes."""
    canonical = {"options": submission.options.model_dump(),
                 "images": [[name, hashlib.sha256(data).hexdigest()] for name, data in submission.images]}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _accept(be: Backend, submission: Submission, idempotency_key: str | None,
            owner: str) -> tuple[JobRecord, bool]:
    """Store the job durably (objects first, then one transaction), then publish its wake-ups.
    Returns the job and whether it is an earlier job replayed for the same Idempotency-Key."""
    digest = request_hash(submission)
    if idempotency_key is not None:
        found = be.store.find_by_idempotency_key(owner, idempotency_key)
        if found is not None:
            return _replayed(found, digest, idempotency_key), True
    job_id = uuid.uuid4().hex
    images = [NewImage(index=index, name=name, object_key=f"{job_id}/{index}", size_bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest()) for index, (name, data) in enumerate(submission.images)]
    try:
        be.objects.put_many([(image.object_key, data) for image, (_, data) in zip(images, submission.images)])
        options = submission.options.model_dump()
        job, created = be.store.create_job(NewJob(
            job_id=job_id, owner=owner, request_hash=digest, images=images, idempotency_key=idempotency_key,
            callback_url=options.pop("callback_url"), params=options))
    except IdempotencyConflict as exc:
        be.objects.delete_prefix(job_id)
        raise RequestRejected("idempotency_key_reused", str(exc), 409) from None
    except OSError as exc:
        be.objects.delete_prefix(job_id)
        raise RequestRejected("object_store_unavailable", f"cannot store the images ({exc}); nothing was stored, "
                              "retry later", 503) from None
    except BaseException:
        be.objects.delete_prefix(job_id)  # nothing half-written: the images go with the failed commit
        raise
    if not created:  # the same key committed concurrently by another request
        be.objects.delete_prefix(job_id)
        return job, True
    queue.publish(be.celery, job.job_id, be.settings.config.queue, queue.wake_ups(job.total, be.settings))
    return job, False


def _replayed(found: JobRecord, digest: str, key: str) -> JobRecord:
    if found.request_hash != digest:
        raise RequestRejected("idempotency_key_reused", str(IdempotencyConflict(key, found.job_id)), 409)
    return found


# --------------------------------------------------------------------------- reading, cancelling
def _job(job_id: str) -> JobRecord:
    """The job if it belongs to the request's tenant; another tenant's job is 404 exactly like a missing
    one, so ids cannot be probed."""
    job = backend().store.get_job(job_id)
    if job is None or job.owner != current_tenant():
        raise RequestRejected("job_not_found", f"no job {job_id!r}", 404)
    return job


@app.get("/jobs/{job_id}", response_model=schemas.JobSummary, responses=ERRORS, summary="A job's status",
         tags=["Jobs"])
def get_job(job_id: str) -> schemas.JobSummary:
    """Status, counts, timestamps, the model version, per-image errors; the results when a small job is done."""
    be = backend()
    return schemas.job_summary(be.store, _job(job_id), inline_results_max=be.settings.config.inline_results_max)


@app.get("/jobs/{job_id}/results", responses={200: {"description": "JSON Lines (application/x-ndjson) or COCO results",
                                                     "content": {"application/x-ndjson": {}, "application/json": {}}},
                                               **ERRORS}, summary="A job's results", tags=["Jobs"])
def get_results(job_id: str, format: Literal["jsonl", "coco"] = Query(  # noqa: A002 (the query parameter's name)
                    "jsonl", description="jsonl: one record per image; coco: COCO results (image_id = index)"),
                from_index: int = Query(0, ge=0, le=2**31 - 1,  # a database INTEGER
                                      description="only the images from this index on")) -> Response:
    """The processed images so far, in submission order (header X-Job-Status says whether more will come)."""
    job = _job(job_id)
    if job.deleted_at is not None:
        raise RequestRejected("job_deleted", f"job {job_id} was deleted with its results", 410)
    store = backend().store
    headers = {"X-Job-Status": job.status}
    if format == "coco":
        records = store.results(job_id, from_index=from_index)
        return JSONResponse(coco_results((r.index, schemas.record_line(r)) for r in records), headers=headers)
    return StreamingResponse(_jsonl(store, job_id, from_index), media_type="application/x-ndjson", headers=headers)


def _jsonl(store: JobStore, job_id: str, start: int) -> Iterator[bytes]:
    while True:
        page = store.results(job_id, from_index=start, limit=RESULTS_PAGE)
        for record in page:
            yield (json.dumps(schemas.record_line(record)) + "\n").encode()
        if len(page) < RESULTS_PAGE:
            return
        start = page[-1].index + 1


@app.delete("/jobs/{job_id}", response_model=schemas.JobSummary, responses=ERRORS, summary="Cancel and delete a job",
            tags=["Jobs"])
def delete_job(job_id: str) -> schemas.JobSummary:
    """Cancel a queued or running job and delete its images and results (a finished job keeps its status)."""
    be = backend()
    _job(job_id)  # 404 for another tenant's job before anything is touched
    job = be.store.cancel(job_id)
    if job is None:
        raise RequestRejected("job_not_found", f"no job {job_id!r}", 404)
    be.objects.delete_prefix(job_id)
    return schemas.job_summary(be.store, job)
