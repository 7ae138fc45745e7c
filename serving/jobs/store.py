"""The job store: the source of truth of every job, behind one small class on SQLAlchemy Core.

SQLite by default (a file, WAL, fsync on commit, write transactions `BEGIN IMMEDIATE`), PostgreSQL
in production (`postgresql+psycopg://...`, row locks with SKIP LOCKED). Four tables:

- `detops_jobs`: one row per accepted job: owner, status, the request's hash and idempotency key
  (unique per owner), detection parameters, callback, the model version that runs it, timestamps,
  the wake-up bookkeeping of the reaper and the webhook outbox (state, attempts, next attempt);
- `detops_job_images`: one row per submitted image (its object key, size, hash) with its lease
  (owner, expiry) and attempt count: the unit of work a worker claims;
- `detops_job_results`: one row per processed image, UNIQUE (job_id, image_index): a result is
  written once whatever happens (insert-or-ignore: a chunk run twice writes its first result only;
  the fault tests count the work done twice from `detops_job_images.attempts`);
- `detops_workers`: the heartbeat of every worker (host, pid, live model version).

Every method is one transaction. A database that cannot be reached raises `StoreUnavailable` (the
API answers 503 with Retry-After; a worker retries with backoff). The schema is created on first use
(`create_schema`); `owner` is the tenant whose key submitted the job (serving/gateway/): every read
of the API is filtered by it, and `erase` / `owner_job_ids` serve `detops purge --tenant`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (BigInteger, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, and_, case, create_engine, delete, event, exists, func, insert, or_,
                        select, update)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from pipelines.errors import DetopsError
from serving.jobs.results import IMAGE_DEAD, IMAGE_FAILED, IMAGE_SUCCEEDED, ImageResult

DEFAULT_OWNER = "default"
QUEUED, RUNNING, SUCCEEDED, PARTIAL, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "partial", "failed", "cancelled")
ACTIVE = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, PARTIAL, FAILED)  # a job in one of these has every image's result; it never changes again
ENDED = (*FINISHED, CANCELLED)  # what a client waiting for a job waits for
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"

metadata = MetaData()

jobs = Table(
    "detops_jobs", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("owner", String(128), nullable=False, default=DEFAULT_OWNER),
    Column("status", String(16), nullable=False),
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64), nullable=False),
    Column("params", Text, nullable=False),
    Column("callback_url", Text),
    Column("total", Integer, nullable=False),
    Column("model_name", String(255)),
    Column("model_version", String(64)),
    Column("error", Text),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("deleted_at", DateTime),
    Column("wakeup_at", DateTime),
    Column("webhook_state", String(16)),
    Column("webhook_attempts", Integer, nullable=False, default=0),
    Column("webhook_next_at", DateTime),
    Column("webhook_lease_until", DateTime),
    Column("webhook_error", Text),
    UniqueConstraint("owner", "idempotency_key", name="uq_detops_jobs_owner_idempotency_key"),
    Index("ix_detops_jobs_status", "status"),
    Index("ix_detops_jobs_webhook", "webhook_state", "webhook_next_at"),
)

job_images = Table(
    "detops_job_images", metadata,
    Column("job_id", String(32), ForeignKey("detops_jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("image_index", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("object_key", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(255)),
    Column("lease_expires_at", DateTime),
)

job_results = Table(
    "detops_job_results", metadata,
    Column("job_id", String(32), ForeignKey("detops_jobs.job_id", ondelete="CASCADE"), nullable=False),
    Column("image_index", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("body", Text),
    Column("error", String(64)),
    Column("detail", Text),
    Column("model_version", String(64)),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("job_id", "image_index", name="uq_detops_job_results_job_image"),
)

workers = Table(
    "detops_workers", metadata,
    Column("worker_id", String(255), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("model_version", String(64)),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
)


class StoreUnavailable(DetopsError):
    """The job database cannot be reached (or refused the transaction for a transient reason)."""


class IdempotencyConflict(DetopsError):
    """An Idempotency-Key already used with a different request body; `job_id` is the first job."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for job {job_id} with a different request")
        self.job_id = job_id


def utcnow() -> datetime:
    """Naive UTC (what every timestamp column holds, on SQLite and PostgreSQL alike)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class NewImage:
    """An image about to be stored with its job (its bytes are already in the object store)."""

    index: int
    name: str
    object_key: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class NewJob:
    job_id: str
    request_hash: str
    params: dict[str, Any]
    images: Sequence[NewImage]
    callback_url: str | None = None
    idempotency_key: str | None = None
    owner: str = DEFAULT_OWNER


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    owner: str
    status: str
    total: int
    params: dict[str, Any]
    callback_url: str | None
    model_name: str | None
    model_version: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deleted_at: datetime | None
    webhook_state: str | None
    webhook_attempts: int
    webhook_error: str | None
    request_hash: str

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        m = row._mapping
        return cls(job_id=m["job_id"], owner=m["owner"], status=m["status"], total=m["total"],
                   params=json.loads(m["params"]), callback_url=m["callback_url"], model_name=m["model_name"],
                   model_version=m["model_version"], error=m["error"], created_at=m["created_at"],
                   started_at=m["started_at"], finished_at=m["finished_at"], deleted_at=m["deleted_at"],
                   webhook_state=m["webhook_state"], webhook_attempts=m["webhook_attempts"],
                   webhook_error=m["webhook_error"], request_hash=m["request_hash"])


@dataclass(frozen=True)
class ResultRecord:
    index: int
    name: str
    status: str
    body: dict[str, Any] | None
    error: str | None
    detail: str | None
    model_version: str | None


@dataclass(frozen=True)
class ClaimedImage:
    index: int
    name: str
    object_key: str
    attempts: int


@dataclass(frozen=True)
class Claim:
    """A chunk of one job's images leased to one worker, and the job it belongs to."""

    job: JobRecord
    images: list[ClaimedImage]


@dataclass(frozen=True)
class Counts:
    """A job's images by the status of their result. `processed` counts every image that has a
    result, whatever its status: a failed or dead-lettered image is processed, not succeeded."""

    total: int
    succeeded: int
    failed: int
    dead: int

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed + self.dead


def job_status(counts: Counts) -> str:
    """The status of a job whose every image has a result: succeeded only when every image
    succeeded, failed when none did, partial otherwise (some failed or were dead-lettered)."""
    if counts.succeeded == counts.total:
        return SUCCEEDED
    return FAILED if counts.succeeded == 0 else PARTIAL


class JobStore:
    """The job tables on one database URL (see the module docstring)."""

    def __init__(self, url: str, *, connect_timeout_s: int = 3) -> None:
        self.url = url
        self.engine = _engine(url, connect_timeout_s)

    def create_schema(self) -> None:
        """Create the tables that do not exist yet."""
        with self._write() as conn:
            metadata.create_all(conn)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite: no lock upgrade can fail later)."""
        with self._translate_errors(), self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._translate_errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            first = str(exc.orig if getattr(exc, "orig", None) is not None else exc).strip().splitlines()[0]
            raise StoreUnavailable(f"job store unavailable ({type(exc).__name__}: {first})") from None

    # ------------------------------------------------------------------ submission (API)
    def find_by_idempotency_key(self, owner: str, key: str) -> JobRecord | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)).first()
        return JobRecord.from_row(row) if row else None

    def create_job(self, job: NewJob) -> tuple[JobRecord, bool]:
        """Store a job and its images in one transaction: (the job, True). With an idempotency key
        already used by the same request: (that earlier job, False); by another request:
        IdempotencyConflict."""
        now = utcnow()
        try:
            with self._write() as conn:
                if job.idempotency_key is not None:
                    found = self._by_key(conn, job.owner, job.idempotency_key)
                    if found is not None:
                        return self._same_request(found, job), False
                conn.execute(insert(jobs).values(
                    job_id=job.job_id, owner=job.owner, status=QUEUED, idempotency_key=job.idempotency_key,
                    request_hash=job.request_hash, params=json.dumps(job.params), callback_url=job.callback_url,
                    total=len(job.images), created_at=now, wakeup_at=now, webhook_attempts=0))
                if job.images:
                    conn.execute(insert(job_images), [
                        {"job_id": job.job_id, "image_index": im.index, "name": im.name, "object_key": im.object_key,
                         "size_bytes": im.size_bytes, "sha256": im.sha256, "attempts": 0} for im in job.images])
                row = conn.execute(select(jobs).where(jobs.c.job_id == job.job_id)).one()
                return JobRecord.from_row(row), True
        except sa_exc.IntegrityError:
            # Another request with the same key committed between our check and our insert.
            found = self.find_by_idempotency_key(job.owner, job.idempotency_key or "")
            if found is None:
                raise
            return self._same_request(found, job), False

    @staticmethod
    def _by_key(conn: Connection, owner: str, key: str) -> JobRecord | None:
        row = conn.execute(select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)).first()
        return JobRecord.from_row(row) if row else None

    @staticmethod
    def _same_request(found: JobRecord, job: NewJob) -> JobRecord:
        if found.request_hash != job.request_hash:
            raise IdempotencyConflict(job.idempotency_key or "", found.job_id)
        return found

    def mark_woken(self, job_id: str) -> None:
        """Record that a wake-up for the job was just published."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(wakeup_at=utcnow()))

    # ------------------------------------------------------------------ reading (API)
    def get_job(self, job_id: str) -> JobRecord | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first()
        return JobRecord.from_row(row) if row else None

    def counts(self, job_id: str) -> Counts:
        with self._read() as conn:
            return self._counts(conn, job_id)

    @staticmethod
    def _counts(conn: Connection, job_id: str) -> Counts:
        total = conn.execute(select(jobs.c.total).where(jobs.c.job_id == job_id)).scalar_one_or_none() or 0
        by_status = dict(conn.execute(select(job_results.c.status, func.count()).where(
            job_results.c.job_id == job_id).group_by(job_results.c.status)).all())
        return Counts(total=total, succeeded=by_status.get(IMAGE_SUCCEEDED, 0),
                      failed=by_status.get(IMAGE_FAILED, 0), dead=by_status.get(IMAGE_DEAD, 0))

    def results(self, job_id: str, *, from_index: int = 0, limit: int | None = None,
                failed_only: bool = False) -> list[ResultRecord]:
        """The job's processed images from `from_index` on (only the failed and dead-lettered ones
        with `failed_only`), in submission order."""
        query = (select(job_results, job_images.c.name)
                 .join(job_images, and_(job_images.c.job_id == job_results.c.job_id,
                                        job_images.c.image_index == job_results.c.image_index))
                 .where(job_results.c.job_id == job_id, job_results.c.image_index >= from_index)
                 .order_by(job_results.c.image_index))
        if failed_only:
            query = query.where(job_results.c.status != IMAGE_SUCCEEDED)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [ResultRecord(index=r.image_index, name=r.name, status=r.status,
                             body=json.loads(r.body) if r.body else None, error=r.error, detail=r.detail,
                             model_version=r.model_version) for r in rows]

    def image_names(self, job_id: str) -> dict[int, str]:
        with self._read() as conn:
            return dict(conn.execute(select(job_images.c.image_index, job_images.c.name)
                                     .where(job_images.c.job_id == job_id)).all())

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued or running job (a finished one keeps its status) and delete its images'
        and results' rows; None when there is no such job. The caller deletes the objects."""
        now = utcnow()
        with self._write() as conn:
            status = conn.execute(select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()
                                  ).scalar_one_or_none()
            if status is None:
                return None
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(
                status=case((jobs.c.status.in_(ACTIVE), CANCELLED), else_=jobs.c.status),
                finished_at=func.coalesce(jobs.c.finished_at, now), deleted_at=func.coalesce(jobs.c.deleted_at, now)))
            conn.execute(delete(job_results).where(job_results.c.job_id == job_id))
            conn.execute(delete(job_images).where(job_images.c.job_id == job_id))
            return JobRecord.from_row(conn.execute(select(jobs).where(jobs.c.job_id == job_id)).one())

    # ------------------------------------------------------------------ tenancy (detops purge)
    def owners(self) -> list[str]:
        """Every tenant that has jobs."""
        with self._read() as conn:
            return [r[0] for r in conn.execute(select(jobs.c.owner).distinct())]

    def owner_job_ids(self, owner: str, *, created_before: datetime | None = None) -> list[str]:
        """The ids of `owner`'s jobs (those created before `created_before`, when given)."""
        query = select(jobs.c.job_id).where(jobs.c.owner == owner)
        if created_before is not None:
            query = query.where(jobs.c.created_at < created_before)
        with self._read() as conn:
            return [r[0] for r in conn.execute(query)]

    def erase(self, job_ids: Sequence[str]) -> int:
        """Delete jobs with every row they have (cancel them first: a worker's chunk then writes
        nothing); the caller deletes their objects. Returns how many jobs went."""
        n = 0
        for start in range(0, len(job_ids), 500):
            ids = list(job_ids[start:start + 500])
            with self._write() as conn:
                conn.execute(delete(job_results).where(job_results.c.job_id.in_(ids)))
                conn.execute(delete(job_images).where(job_images.c.job_id.in_(ids)))
                n += conn.execute(delete(jobs).where(jobs.c.job_id.in_(ids))).rowcount
        return n

    # ------------------------------------------------------------------ work (workers)
    def claim(self, job_id: str, *, worker: str, model_name: str, live_version: str, chunk_size: int,
              lease_s: float, max_attempts: int) -> Claim | None:
        """Lease the next chunk of the job's unprocessed images to `worker`: None when the job is gone
        or finished. The job is pinned to `live_version` on its first claim (its later chunks run on
        the same version). Images that already used `max_attempts` (their worker crashed or timed
        out each time) are dead-lettered here. Fresh images are claimed `chunk_size` at a time;
        an image retried after a crash is claimed alone, so that a poison image cannot take the
        rest of a chunk down with it again. The claim may hold no image (all leased elsewhere)."""
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(update(jobs).where(jobs.c.job_id == job_id, jobs.c.status.in_(ACTIVE)).values(
                status=RUNNING, started_at=func.coalesce(jobs.c.started_at, now),
                model_name=func.coalesce(jobs.c.model_name, model_name),
                model_version=func.coalesce(jobs.c.model_version, live_version)).returning(*jobs.c)).first()
            if row is None:
                return None
            job = JobRecord.from_row(row)
            unprocessed = ~exists().where(job_results.c.job_id == job_images.c.job_id,
                                          job_results.c.image_index == job_images.c.image_index)
            free = or_(job_images.c.lease_expires_at.is_(None), job_images.c.lease_expires_at < now)
            mine = and_(job_images.c.job_id == job_id, unprocessed, free)
            dead = conn.execute(select(job_images.c.image_index, job_images.c.attempts)
                                .where(mine, job_images.c.attempts >= max_attempts)).all()
            if dead:
                _insert_ignore(conn, job_results, [
                    {"job_id": job_id, "image_index": index, "status": IMAGE_DEAD, "error": "poison_image",
                     "detail": f"the worker crashed or timed out on this image {attempts} times "
                               f"(jobs.max_attempts: {max_attempts}); dead-lettered",
                     "model_version": job.model_version, "created_at": now} for index, attempts in dead])
            indices = self._claimable(conn, mine & (job_images.c.attempts == 0), chunk_size)
            if not indices:
                indices = self._claimable(conn, mine & job_images.c.attempts.between(1, max_attempts - 1), 1)
            images: list[ClaimedImage] = []
            if indices:
                claimed = conn.execute(
                    update(job_images).where(job_images.c.job_id == job_id, job_images.c.image_index.in_(indices), free)
                    .values(attempts=job_images.c.attempts + 1, lease_owner=worker,
                            lease_expires_at=now + timedelta(seconds=lease_s))
                    .returning(job_images.c.image_index, job_images.c.name, job_images.c.object_key,
                               job_images.c.attempts)).all()
                images = sorted((ClaimedImage(*r) for r in claimed), key=lambda im: im.index)
        return Claim(job=job, images=images)

    @staticmethod
    def _claimable(conn: Connection, condition: Any, limit: int) -> list[int]:
        return list(conn.execute(select(job_images.c.image_index).where(condition)
                                 .order_by(job_images.c.image_index).limit(limit)
                                 .with_for_update(skip_locked=True)).scalars())

    def record_results(self, job_id: str, worker: str, model_version: str, results: Sequence[ImageResult]) -> bool:
        """Write the results of a chunk (insert-or-ignore: a result already written stays as it is)
        and release the worker's leases. False, writing nothing, when the job is no longer running
        (cancelled meanwhile)."""
        now = utcnow()
        with self._write() as conn:
            status = conn.execute(select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()
                                  ).scalar_one_or_none()
            if status != RUNNING:
                return False
            _insert_ignore(conn, job_results, [
                {"job_id": job_id, "image_index": r.index, "status": r.status,
                 "body": json.dumps(r.body) if r.body is not None else None, "error": r.error, "detail": r.detail,
                 "model_version": model_version, "created_at": now} for r in results])
            conn.execute(update(job_images).where(
                job_images.c.job_id == job_id, job_images.c.image_index.in_([r.index for r in results]),
                job_images.c.lease_owner == worker).values(lease_owner=None, lease_expires_at=None))
        return True

    def has_claimable(self, job_id: str, max_attempts: int) -> bool:
        """Whether unprocessed images of the job are free to claim now (or due to be dead-lettered)."""
        now = utcnow()
        unprocessed = ~exists().where(job_results.c.job_id == job_images.c.job_id,
                                      job_results.c.image_index == job_images.c.image_index)
        free = or_(job_images.c.lease_expires_at.is_(None), job_images.c.lease_expires_at < now)
        with self._read() as conn:
            return conn.execute(select(exists().where(job_images.c.job_id == job_id, unprocessed, free))).scalar()

    def finish_if_complete(self, job_id: str) -> JobRecord | None:
        """Finish a running job whose every image has a result, with the status `job_status` gives,
        and queue its webhook; the finished job when this call finished it, else None."""
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(select(jobs.c.status, jobs.c.callback_url).where(jobs.c.job_id == job_id)
                               .with_for_update()).first()
            if row is None or row.status != RUNNING:
                return None
            counts = self._counts(conn, job_id)
            if counts.processed < counts.total:
                return None
            status = job_status(counts)
            error = {SUCCEEDED: None,
                     PARTIAL: f"{counts.total - counts.succeeded} of {counts.total} images could not be processed "
                              "(see each image's error)",
                     FAILED: "no image of the job could be processed (see each image's error)"}[status]
            return self._finish(conn, job_id, status, error, row.callback_url, now)

    def fail_job(self, job_id: str, reason: str) -> JobRecord | None:
        """Mark an active job failed with `reason` (e.g. its model version cannot be loaded)."""
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(select(jobs.c.status, jobs.c.callback_url).where(jobs.c.job_id == job_id)
                               .with_for_update()).first()
            if row is None or row.status not in ACTIVE:
                return None
            return self._finish(conn, job_id, FAILED, reason, row.callback_url, now)

    @staticmethod
    def _finish(conn: Connection, job_id: str, status: str, error: str | None, callback_url: str | None,
                now: datetime) -> JobRecord:
        conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(
            status=status, error=error, finished_at=now,
            webhook_state=WEBHOOK_PENDING if callback_url else None, webhook_next_at=now if callback_url else None))
        return JobRecord.from_row(conn.execute(select(jobs).where(jobs.c.job_id == job_id)).one())

    # ------------------------------------------------------------------ housekeeping (reaper)
    def stalled_jobs(self, *, reap_interval_s: float, requeue_after_s: float) -> list[str]:
        """Active jobs that need a new wake-up, marked as woken now: those holding an image whose
        lease expired (its worker died or was killed for its time limit), and those with nothing
        leased whose last wake-up is older than `requeue_after_s` (a broker lost the message, or
        the API died between its commit and its publish)."""
        now = utcnow()
        unprocessed = ~exists().where(job_results.c.job_id == job_images.c.job_id,
                                      job_results.c.image_index == job_images.c.image_index)
        expired = exists().where(job_images.c.job_id == jobs.c.job_id, unprocessed,
                                 job_images.c.lease_owner.is_not(None), job_images.c.lease_expires_at < now)
        leased = exists().where(job_images.c.job_id == jobs.c.job_id, unprocessed,
                                job_images.c.lease_expires_at >= now)
        due = or_(and_(expired, jobs.c.wakeup_at < now - timedelta(seconds=reap_interval_s)),
                  and_(~leased, jobs.c.wakeup_at < now - timedelta(seconds=requeue_after_s)))
        with self._write() as conn:
            return list(conn.execute(update(jobs).where(jobs.c.status.in_(ACTIVE), due).values(wakeup_at=now)
                                     .returning(jobs.c.job_id)).scalars())

    def unfinished_complete_jobs(self) -> list[str]:
        """Running jobs whose every image has a result (their worker died before finishing them)."""
        done = select(func.count()).where(job_results.c.job_id == jobs.c.job_id).scalar_subquery()
        with self._read() as conn:
            return list(conn.execute(select(jobs.c.job_id).where(jobs.c.status == RUNNING, jobs.c.total == done))
                        .scalars())

    def heartbeat(self, worker_id: str, *, hostname: str, pid: int, model_version: str | None) -> None:
        """Record that a worker is alive and which model version it runs."""
        now = utcnow()
        with self._write() as conn:
            found = conn.execute(update(workers).where(workers.c.worker_id == worker_id).values(
                heartbeat_at=now, model_version=model_version)).rowcount
            if not found:
                conn.execute(insert(workers).values(worker_id=worker_id, hostname=hostname, pid=pid,
                                                    model_version=model_version, started_at=now, heartbeat_at=now))

    def remove_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(delete(workers).where(workers.c.worker_id == worker_id))

    def consumers(self, within_s: float) -> tuple[int, datetime | None]:
        """How many workers heartbeated within `within_s` seconds, and when the oldest queued job was
        accepted (None: none queued). One cheap read: /readyz and /metrics ask it in the background."""
        since = utcnow() - timedelta(seconds=within_s)
        with self._read() as conn:
            alive = conn.execute(select(func.count()).select_from(workers)
                                 .where(workers.c.heartbeat_at >= since)).scalar_one()
            oldest = conn.execute(select(func.min(jobs.c.created_at)).where(jobs.c.status == QUEUED)).scalar()
        return alive, oldest

    def live_workers(self, within_s: float) -> list[dict[str, Any]]:
        """Workers whose heartbeat is more recent than `within_s` seconds."""
        since = utcnow() - timedelta(seconds=within_s)
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(select(workers).where(workers.c.heartbeat_at >= since))]

    # ------------------------------------------------------------------ webhook outbox
    def claim_webhooks(self, *, lease_s: float, limit: int) -> list[JobRecord]:
        """Lease up to `limit` due webhook deliveries (each job to one dispatcher at a time)."""
        now = utcnow()
        due = and_(jobs.c.webhook_state == WEBHOOK_PENDING, jobs.c.webhook_next_at <= now,
                   or_(jobs.c.webhook_lease_until.is_(None), jobs.c.webhook_lease_until < now))
        with self._write() as conn:
            rows = conn.execute(update(jobs).where(jobs.c.job_id.in_(
                select(jobs.c.job_id).where(due).order_by(jobs.c.webhook_next_at).limit(limit)
                .with_for_update(skip_locked=True)), due)
                .values(webhook_lease_until=now + timedelta(seconds=lease_s)).returning(*jobs.c)).all()
        return [JobRecord.from_row(r) for r in rows]

    def webhook_attempted(self, job_id: str, *, delivered: bool, error: str | None,
                          retry_in_s: float | None) -> None:
        """Record one delivery attempt: delivered, to be retried in `retry_in_s`, or (None) given up."""
        now = utcnow()
        if delivered:
            state, next_at = WEBHOOK_DELIVERED, None
        elif retry_in_s is None:
            state, next_at = WEBHOOK_FAILED, None
        else:
            state, next_at = WEBHOOK_PENDING, now + timedelta(seconds=retry_in_s)
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(
                webhook_state=state, webhook_attempts=jobs.c.webhook_attempts + 1, webhook_error=error,
                webhook_next_at=next_at, webhook_lease_until=None))


def _insert_ignore(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING, in the dialect at hand."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        raise DetopsError(f"job store: unsupported database {conn.dialect.name!r} (SQLite or PostgreSQL)")
    conn.execute(dialect_insert(table).on_conflict_do_nothing(), rows)


def _engine(url: str, connect_timeout_s: int) -> Engine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("sqlite_immediate")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": connect_timeout_s})
    raise DetopsError(f"DETOPS_DATABASE_URL: {url.split(':', 1)[0]!r} is not supported "
                      "(sqlite:///path.db or postgresql+psycopg://user@host/db)")
