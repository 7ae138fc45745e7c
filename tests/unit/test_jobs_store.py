"""The job store's rules on both databases it supports: SQLite (a file) and PostgreSQL (a database
of this test's own on the machine's server): idempotent creation, leases and claims, insert-or-ignore
results under the unique constraint, dead letters, cancellation, completion, the reaper's choices
and the webhook outbox."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from serving.jobs import store as st
from serving.jobs.results import ImageResult
from serving.jobs.store import (IdempotencyConflict, JobStore, NewImage, NewJob, StoreUnavailable,
                                job_results)
from tests.jobs_services import check_job_status, postgres_database


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    jobs = JobStore(url)
    jobs.create_schema()
    yield jobs
    if request.param == "postgresql":  # the database outlives the test: empty it
        with jobs.engine.begin() as conn:
            for table in reversed(st.metadata.sorted_tables):
                conn.execute(table.delete())
    jobs.close()


def new_job(job_id: str, n: int, *, key: str | None = None, request_hash: str = "h1",
            callback: str | None = None) -> NewJob:
    images = [NewImage(index=i, name=f"img{i}.jpg", object_key=f"{job_id}/{i}", size_bytes=10, sha256="0" * 64)
              for i in range(n)]
    return NewJob(job_id=job_id, request_hash=request_hash, params={"conf": 0.5}, images=images,
                  idempotency_key=key, callback_url=callback)


def claim(store: JobStore, job_id: str, worker: str = "w1", chunk: int = 2, lease_s: float = 60,
          max_attempts: int = 3) -> st.Claim | None:
    return store.claim(job_id, worker=worker, model_name="m", live_version="7", chunk_size=chunk,
                       lease_s=lease_s, max_attempts=max_attempts)


def ok(*indices: int) -> list[ImageResult]:
    return [ImageResult(index=i, status=st.IMAGE_SUCCEEDED, body={"detections": [], "i": i}) for i in indices]


def test_idempotent_creation(store: JobStore) -> None:
    first, created = store.create_job(new_job("a" * 32, 2, key="k1"))
    assert created and first.status == st.QUEUED and first.total == 2
    again, created = store.create_job(new_job("b" * 32, 2, key="k1"))
    assert not created and again.job_id == "a" * 32
    with pytest.raises(IdempotencyConflict, match="k1") as raised:
        store.create_job(new_job("c" * 32, 2, key="k1", request_hash="h2"))
    assert raised.value.job_id == "a" * 32
    assert store.get_job("b" * 32) is None and store.get_job("c" * 32) is None
    assert store.create_job(new_job("d" * 32, 1))[1]  # no key: always a new job


def test_claims_leases_results_and_completion(store: JobStore) -> None:
    job_id = "j" * 32
    store.create_job(new_job(job_id, 5, callback="https://example.com/hook"))
    first = claim(store, job_id)
    assert first.job.status == st.RUNNING and first.job.model_version == "7"
    assert [im.index for im in first.images] == [0, 1]
    second = claim(store, job_id, worker="w2")
    assert [im.index for im in second.images] == [2, 3]  # leased images are not handed out twice
    # The job stays on the version it started with, whatever is live later.
    later = store.claim(job_id, worker="w3", model_name="m", live_version="8", chunk_size=2, lease_s=60,
                        max_attempts=3)
    assert later.job.model_version == "7" and [im.index for im in later.images] == [4]
    assert [im.index for im in claim(store, job_id).images] == []  # everything leased
    assert store.record_results(job_id, "w1", "7", ok(0, 1))
    assert store.record_results(job_id, "w1", "7", ok(0, 1))  # a replay: insert-or-ignore
    assert store.finish_if_complete(job_id) is None
    assert store.record_results(job_id, "w2", "7", ok(2, 3) + [ImageResult(4, st.IMAGE_FAILED, error="corrupt_image",
                                                                             detail="bad")])
    finished = store.finish_if_complete(job_id)
    # One image failed: partial, the count in its error.
    assert finished is not None and finished.status == st.PARTIAL and finished.webhook_state == st.WEBHOOK_PENDING
    assert finished.error.startswith("1 of 5 images") and check_job_status(store, job_id) == st.PARTIAL
    assert store.finish_if_complete(job_id) is None  # only one caller finishes it
    assert store.counts(job_id) == st.Counts(total=5, succeeded=4, failed=1, dead=0)
    results = store.results(job_id)
    assert [r.index for r in results] == [0, 1, 2, 3, 4] and results[0].body == {"detections": [], "i": 0}
    assert results[4].error == "corrupt_image" and results[4].name == "img4.jpg"
    assert [r.index for r in store.results(job_id, from_index=3)] == [3, 4]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(job_results)).scalar() == 5
    assert claim(store, job_id) is None  # finished: nothing to claim


def test_expired_leases_are_reclaimed_alone_then_dead_lettered(store: JobStore) -> None:
    job_id = "p" * 32
    store.create_job(new_job(job_id, 3))
    assert len(claim(store, job_id, chunk=3, lease_s=0.05).images) == 3  # the worker dies holding them
    time.sleep(0.1)
    assert store.stalled_jobs(reap_interval_s=0, requeue_after_s=3600) == [job_id]
    assert store.stalled_jobs(reap_interval_s=3600, requeue_after_s=3600) == []  # woken: not twice in a row
    for attempt in (2, 3):  # retried one at a time: the poison image (0) cannot take the others down
        retried = claim(store, job_id, chunk=3, lease_s=0.05)
        assert [(im.index, im.attempts) for im in retried.images] == [(0, attempt)]
        time.sleep(0.1)
    retried = claim(store, job_id, chunk=3, lease_s=60)
    assert [im.index for im in retried.images] == [1]  # 0 used its 3 attempts: dead-lettered in this claim
    counts = store.counts(job_id)
    assert counts.dead == 1
    dead, = store.results(job_id)
    assert dead.status == st.IMAGE_DEAD and dead.error == "poison_image" and "3 times" in dead.detail
    store.record_results(job_id, "w1", "7", ok(1))
    store.record_results(job_id, "w1", "7", ok(2))  # a late writer whose lease expired: still written once
    assert store.finish_if_complete(job_id).status == st.PARTIAL  # a dead letter is no success
    assert check_job_status(store, job_id) == st.PARTIAL


def test_a_job_succeeds_only_when_every_image_did_and_fails_when_none_did(store: JobStore) -> None:
    bad = [ImageResult(index=i, status=st.IMAGE_FAILED, error="corrupt_image", detail="bad") for i in (0, 1)]
    for job_id, results, status in (("s" * 32, ok(0, 1), st.SUCCEEDED), ("f" * 32, bad, st.FAILED)):
        store.create_job(new_job(job_id, 2))
        claim(store, job_id)
        store.record_results(job_id, "w1", "7", results)
        assert store.finish_if_complete(job_id).status == status == check_job_status(store, job_id)


def test_cancel_deletes_rows_and_stops_writers(store: JobStore) -> None:
    job_id = "c" * 32
    store.create_job(new_job(job_id, 3))
    claim(store, job_id, chunk=1)
    store.record_results(job_id, "w1", "7", ok(0))
    cancelled = store.cancel(job_id)
    assert cancelled.status == st.CANCELLED and cancelled.deleted_at is not None
    assert store.results(job_id) == [] and store.image_names(job_id) == {}
    assert not store.record_results(job_id, "w1", "7", ok(1))  # a chunk in flight writes nothing
    assert store.results(job_id) == [] and claim(store, job_id) is None
    assert store.cancel("x" * 32) is None


def test_reaper_requeues_untouched_jobs_and_finds_unfinished_complete_ones(store: JobStore) -> None:
    store.create_job(new_job("q" * 32, 1))
    assert store.stalled_jobs(reap_interval_s=0, requeue_after_s=3600) == []  # just published
    time.sleep(0.05)
    assert store.stalled_jobs(reap_interval_s=0, requeue_after_s=0.01) == ["q" * 32]
    claim(store, "q" * 32)
    store.record_results("q" * 32, "w1", "7", ok(0))  # the worker dies before finishing the job
    assert store.unfinished_complete_jobs() == ["q" * 32]


def test_webhook_outbox(store: JobStore) -> None:
    job_id = "w" * 32
    store.create_job(new_job(job_id, 1, callback="https://example.com/hook"))
    claim(store, job_id)
    store.record_results(job_id, "w1", "7", ok(0))
    store.finish_if_complete(job_id)
    due, = store.claim_webhooks(lease_s=60, limit=10)
    assert due.job_id == job_id and store.claim_webhooks(lease_s=60, limit=10) == []  # leased
    store.webhook_attempted(job_id, delivered=False, error="HTTP 503", retry_in_s=0)
    retry, = store.claim_webhooks(lease_s=60, limit=10)
    store.webhook_attempted(job_id, delivered=True, error=None, retry_in_s=None)
    job = store.get_job(job_id)
    assert (job.webhook_state, job.webhook_attempts, job.webhook_error) == (st.WEBHOOK_DELIVERED, 2, None)


def test_heartbeats(store: JobStore) -> None:
    store.heartbeat("host:1", hostname="host", pid=1, model_version="7")
    store.heartbeat("host:1", hostname="host", pid=1, model_version="8")
    assert [(w["pid"], w["model_version"]) for w in store.live_workers(within_s=60)] == [(1, "8")]
    store.remove_worker("host:1")
    assert store.live_workers(within_s=60) == []


def test_an_unreachable_database_is_store_unavailable(tmp_path: Path) -> None:
    from pipelines.processes import free_port

    down = JobStore(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing", connect_timeout_s=1)
    with pytest.raises(StoreUnavailable, match="job store unavailable"):
        down.get_job("x")
    with pytest.raises(Exception, match="not supported"):
        JobStore("mysql://x/y")
