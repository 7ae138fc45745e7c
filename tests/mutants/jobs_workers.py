"""Job worker mutants: a `detops worker` that cannot be seen or does not stop, and the fault that made
one hang for real.

- `stuck_pool` (a fault, not a mutant: the product must survive it): billiard's pool never finishes
  joining, its task handler blocked forever as it was with a lock left held by a killed pool process
  (the reported SIGTERM hang, made certain). The product's grace watch must still stop the worker
  within jobs.shutdown_grace_s (tests/integration/test_jobs_workers.py, the test named below).
- `no_grace`: `stuck_pool` with the worker's grace watch (thread and alarm) removed: Celery's own
  shutdown only. The guarantee: a worker stops within its grace after SIGTERM. Expected to fail with
  it: `check_stops` in tests/integration/test_jobs_workers.py::test_stuck_pool_still_stops_and_mutants_fail_the_worker_checks.
- `no_heartbeat`: a worker whose heartbeat never writes. The guarantee: /readyz and /metrics count the
  live workers. Expected to fail with it: `check_counted` in
  tests/integration/test_jobs_workers.py::test_stuck_pool_still_stops_and_mutants_fail_the_worker_checks.

`python -m tests.mutants.jobs_workers no_grace -- worker --concurrency 1` runs `detops worker` with
the mutant installed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock


@contextmanager
def stuck_pool() -> Iterator[None]:
    """billiard's `TaskHandler.tell_others` (the sentinels `Pool.join` waits for) blocking forever."""
    import billiard.pool

    def blocked(self: Any) -> None:
        threading.Event().wait()

    with mock.patch.object(billiard.pool.TaskHandler, "tell_others", blocked):
        yield


@contextmanager
def no_grace() -> Iterator[None]:
    """`stuck_pool`, and the worker's grace watch never started."""
    from celery.signals import worker_init

    from serving.jobs import worker

    with ExitStack() as stack:
        stack.enter_context(stuck_pool())
        worker_init.disconnect(worker._start_grace_watch)
        yield


@contextmanager
def no_heartbeat() -> Iterator[None]:
    """`JobStore.heartbeat` writing nothing."""
    from serving.jobs.store import JobStore

    with mock.patch.object(JobStore, "heartbeat", lambda self, *args, **kwargs: None):
        yield


MUTANTS = {"stuck_pool": stuck_pool, "no_grace": no_grace, "no_heartbeat": no_heartbeat}


def main(argv: list[str]) -> None:
    """`<mutant> -- <detops arguments>`: run the `detops` CLI with the mutant installed."""
    if len(argv) < 2 or argv[0] not in MUTANTS or argv[1] != "--":
        sys.exit(f"usage: python -m tests.mutants.jobs_workers {{{','.join(MUTANTS)}}} -- <detops arguments>")
    from pipelines.cli.main import app

    with MUTANTS[argv[0]]():
        sys.argv = ["detops", *argv[2:]]
        app()


if __name__ == "__main__":
    main(sys.argv[1:])
