"""Job mutants: the durable jobs breaking one of their guarantees.

- `done_before_result` (runs inside `detops worker`): a worker that marks each image done when it
  claims it (a succeeded result with no body) and fills the result in only when its chunk ends, so a
  worker killed mid-chunk leaves images "done" with nothing. The guarantee: every image of a job made
  of good images succeeded. Expected to fail with it: `check_jobs` in
  tests/integration/test_jobs.py::test_mutant_worker_marking_images_done_first_fails_the_fault_check.
- `dead_letters_succeed`: a job's status counting dead-lettered images as succeeded. The guarantee:
  a job is succeeded only when every image succeeded. Expected to fail with it: `check_job_status` in
  tests/unit/test_jobs_guarantees.py::test_mutant_counting_dead_letters_as_success_fails_the_status_check.
- `webhook_twice_with_new_ids`: a webhook sender that POSTs each delivery twice, each with a new
  delivery id. The guarantee: a job's end reaches the receiver once after dedupe by delivery id.
  Expected to fail with it: `check_webhooks` in
  tests/unit/test_jobs_guarantees.py::test_mutant_webhook_sent_twice_with_new_ids_fails_the_once_check.

`python -m tests.mutants.jobs done_before_result -- worker --concurrency 1` runs `detops worker`
with the mutant installed (Celery's prefork pool forks it into every pool process).
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from sqlalchemy import update

import serving.jobs.store
import serving.jobs.webhooks
from serving.jobs.results import IMAGE_SUCCEEDED
from serving.jobs.store import Counts, JobStore, _insert_ignore, job_results, utcnow


@contextmanager
def done_before_result() -> Iterator[None]:
    """`JobStore.claim` writing a bodiless succeeded result for each image it leases, and
    `record_results` overwriting those placeholders with the real results."""
    real_claim, real_record = JobStore.claim, JobStore.record_results

    def claim(self: JobStore, job_id: str, **kwargs: Any) -> Any:
        found = real_claim(self, job_id, **kwargs)
        if found is not None and found.images:
            with self._write() as conn:
                _insert_ignore(conn, job_results, [
                    {"job_id": job_id, "image_index": image.index, "status": IMAGE_SUCCEEDED,
                     "model_version": found.job.model_version, "created_at": utcnow()} for image in found.images])
        return found

    def record_results(self: JobStore, job_id: str, worker: str, model_version: str, results: Any) -> bool:
        with self._write() as conn:
            for r in results:
                conn.execute(update(job_results).where(job_results.c.job_id == job_id,
                                                       job_results.c.image_index == r.index).values(
                    status=r.status, body=json.dumps(r.body) if r.body is not None else None, error=r.error,
                    detail=r.detail))
        return real_record(self, job_id, worker, model_version, results)

    with mock.patch.object(JobStore, "claim", claim), mock.patch.object(JobStore, "record_results", record_results):
        yield


@contextmanager
def dead_letters_succeed() -> Iterator[None]:
    """`job_status` seeing each dead-lettered image as a succeeded one."""
    real = serving.jobs.store.job_status

    def mutant(counts: Counts) -> str:
        return real(Counts(total=counts.total, succeeded=counts.succeeded + counts.dead, failed=counts.failed,
                           dead=0))

    with mock.patch.object(serving.jobs.store, "job_status", mutant):
        yield


@contextmanager
def webhook_twice_with_new_ids() -> Iterator[None]:
    """`deliver` POSTing twice, a new delivery id each time."""
    real = serving.jobs.webhooks.deliver

    def mutant(*args: Any, **kwargs: Any) -> str | None:
        first = real(*args, **kwargs)
        return real(*args, **kwargs) or first

    with mock.patch.object(serving.jobs.webhooks, "deliver", mutant), \
            mock.patch.object(serving.jobs.webhooks, "delivery_id", lambda payload: uuid.uuid4().hex):
        yield


MUTANTS = {"done_before_result": done_before_result, "dead_letters_succeed": dead_letters_succeed,
           "webhook_twice_with_new_ids": webhook_twice_with_new_ids}


def main(argv: list[str]) -> None:
    """`<mutant> -- <detops arguments>`: run the `detops` CLI with the mutant installed."""
    if len(argv) < 2 or argv[0] not in MUTANTS or argv[1] != "--":
        sys.exit(f"usage: python -m tests.mutants.jobs {{{','.join(MUTANTS)}}} -- <detops arguments>")
    from pipelines.cli.main import app

    with MUTANTS[argv[0]]():
        sys.argv = ["detops", *argv[2:]]
        app()


if __name__ == "__main__":
    main(sys.argv[1:])
