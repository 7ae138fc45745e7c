"""Two job guarantees checked in-process on a SQLite job store, each also with the mutant that breaks
it (tests/mutants/jobs.py), which must make its check fail:

- a job's status says what happened: a dead-lettered image makes the job partial, not succeeded
  (`check_job_status`);
- a job's end reaches its webhook receiver once after dedupe: at least once, every POST with the
  job's one delivery id; a POST the receiver took but answered too late is sent again with the same
  id, and the receiver acts once (`check_webhooks`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.config.jobs import JobsConfig
from serving.jobs import store as st
from serving.jobs.results import ImageResult
from serving.jobs.schemas import job_summary
from serving.jobs.store import JobStore, NewImage, NewJob
from serving.jobs.webhooks import WebhookDispatcher
from tests.jobs_services import WebhookReceiver, check_job_status, check_webhooks, wait_until, webhook_receiver
from tests.mutants import jobs as mutants

SECRET = "guarantees-secret"
CFG = JobsConfig(webhook_schemes=["http"], webhook_allow_private=True, webhook_timeout_s=0.5,
                 webhook_backoff_s=0.05, webhook_backoff_max_s=0.1, webhook_max_attempts=3)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[JobStore]:
    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    jobs.create_schema()
    yield jobs
    jobs.close()


def finished_job(store: JobStore, job_id: str, *, dead_letter: bool, callback: str | None = None) -> None:
    """A 2-image job run to its end as workers run it: image 0 succeeds; with `dead_letter`, image 1's
    worker dies and it is dead-lettered (jobs.max_attempts 1), else it succeeds too."""
    images = [NewImage(index=i, name=f"{i}.jpg", object_key=f"{job_id}/{i}", size_bytes=1, sha256="0" * 64)
              for i in range(2)]
    store.create_job(NewJob(job_id=job_id, request_hash="h", params={}, images=images, callback_url=callback))
    lease_s = 0.05 if dead_letter else 60
    store.claim(job_id, worker="w", model_name="m", live_version="1", chunk_size=2, lease_s=lease_s, max_attempts=1)
    done = [0] if dead_letter else [0, 1]
    store.record_results(job_id, "w", "1", [ImageResult(i, st.IMAGE_SUCCEEDED, body={"detections": []}) for i in done])
    if dead_letter:
        time.sleep(0.1)  # image 1's lease expires: the next claim dead-letters it
        store.claim(job_id, worker="w", model_name="m", live_version="1", chunk_size=2, lease_s=60, max_attempts=1)
    assert store.finish_if_complete(job_id) is not None


def test_a_dead_letter_makes_a_job_partial(store: JobStore) -> None:
    finished_job(store, "d" * 32, dead_letter=True)
    assert check_job_status(store, "d" * 32) == "partial"


def test_mutant_counting_dead_letters_as_success_fails_the_status_check(store: JobStore) -> None:
    with mutants.dead_letters_succeed():
        finished_job(store, "d" * 32, dead_letter=True)
    with pytest.raises(AssertionError, match="'succeeded' but its results call for 'partial'"):
        check_job_status(store, "d" * 32)


def deliver_all(store: JobStore, receiver: WebhookReceiver, job_id: str) -> None:
    """Run a worker's webhook dispatcher until the job's delivery is recorded as delivered."""
    dispatcher = WebhookDispatcher(store, CFG, SECRET, summary=lambda j: job_summary(store, store.get_job(j))
                                   .model_dump(mode="json"))
    try:
        def delivered() -> bool:
            dispatcher.dispatch()
            if receiver.delay_s and receiver.posts(job_id):
                receiver.delay_s = 0  # the first POST is held past the sender's timeout; the next is answered
            return store.get_job(job_id).webhook_state == st.WEBHOOK_DELIVERED
        wait_until(delivered, timeout_s=30, what="the webhook delivered", interval_s=0.05)
    finally:
        dispatcher.close()


def test_webhook_sent_again_with_its_delivery_id_is_taken_once(store: JobStore) -> None:
    with webhook_receiver() as receiver:
        finished_job(store, "w" * 32, dead_letter=False, callback=receiver.url)
        receiver.delay_s = 2 * CFG.webhook_timeout_s  # the receiver takes it, the sender times out and retries
        deliver_all(store, receiver, "w" * 32)
        wait_until(lambda: len(receiver.delivery_ids("w" * 32)) == 2, timeout_s=10, what="the late answer")
        assert check_webhooks(receiver, store, ["w" * 32]) == "1 of 1 (2 POSTs)"  # two POSTs, one delivery
        assert store.get_job("w" * 32).webhook_attempts == 2


def test_mutant_webhook_sent_twice_with_new_ids_fails_the_once_check(store: JobStore) -> None:
    with webhook_receiver() as receiver, mutants.webhook_twice_with_new_ids():
        finished_job(store, "w" * 32, dead_letter=False, callback=receiver.url)
        deliver_all(store, receiver, "w" * 32)
        with pytest.raises(AssertionError, match="2 delivery ids"):
            check_webhooks(receiver, store, ["w" * 32])
