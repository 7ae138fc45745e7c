"""Job workers are visible and stop, for real: `bentoml serve` with the /jobs routes and `detops worker`
processes on the embedded default (`make serve`'s: SQLite job store, SQLite broker, a folder of images,
billiard's plain pool), short heartbeat, lease and grace settings.

- With no worker alive, /readyz stays ready but says no worker is consuming, /metrics counts 0 and ages
  the oldest queued job, and `POST /jobs` still answers 202, saying no worker is consuming; a started
  worker is counted and runs the queued job.
- SIGTERM stops a worker within jobs.shutdown_grace_s (plus a generous slack) in every state: idle,
  mid-chunk (the job then completes on the next worker: nothing accepted is lost), after finishing a job
  recovered from a kill -9 of one of its pool processes (signal to its whole process group, as a shell
  or systemd sends it: the case that hung), and with billiard's pool join stuck for good (the reported
  hang, made certain by tests/mutants/jobs_workers.py `stuck_pool`).
- Mutants (tests/mutants/jobs_workers.py): a worker without the grace watch does not stop, a worker
  whose heartbeat never writes is not counted: the same checks fail.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from pipelines.processes import alive, spawn, stop
from serving.jobs import store as st
from serving.jobs.store import JobStore
from tests.fixtures import images
from tests.jobs_services import register_model_dir, start_worker, wait_until
from tests.serving_process import ROOT, detector_service, service_env

pytestmark = pytest.mark.integration

MODEL_NAME = "detops-workers-test"
GRACE_S = 3.0  # jobs.shutdown_grace_s here
SLACK_S = 10.0  # on top of the grace: a noisy machine, never an unbounded hang
LEASE_S = 4.0  # jobs.worker_lease_s here (heartbeat every 0.5 s)
SETTINGS = {
    "DETOPS_JOBS_CHUNK_SIZE": "2", "DETOPS_JOBS_PARALLEL_CHUNKS": "2", "DETOPS_JOBS_CHUNK_TIME_LIMIT_S": "3",
    "DETOPS_JOBS_LEASE_SLACK_S": "1", "DETOPS_JOBS_REAP_INTERVAL_S": "0.5", "DETOPS_JOBS_REQUEUE_AFTER_S": "3",
    "DETOPS_JOBS_MODEL_CHECK_INTERVAL_S": "0.5", "DETOPS_JOBS_WORKER_LEASE_S": str(LEASE_S),
    "DETOPS_JOBS_SHUTDOWN_GRACE_S": str(GRACE_S), "DETOPS_JOBS_MAX_IMAGE_BYTES": "3000000",
    "DETOPS_GATEWAY_DEPENDENCY_CHECK_S": "0.3", "DETOPS_SERVE_WORKERS": "1", "DETOPS_SERVE_MAX_PIXELS": "400000000",
}


@dataclass
class Stack:
    url: str
    env: dict[str, str]  # the workers'
    store: JobStore
    workdir: Path
    workers: list[int] = field(default_factory=list)  # PIDs started here (each its own process group)

    def start_worker(self, concurrency: int = 1) -> int:
        worker = start_worker(self.env, self.workdir / f"worker-{time.monotonic_ns()}.log", concurrency=concurrency,
                              store_url=self.store.url)
        self.workers.append(worker.pid)
        return worker.pid

    def start_mutants(self, *mutants: str) -> dict[str, tuple[int, Path]]:
        """`detops worker` with each tests/mutants/jobs_workers.py mutant, started together; returns
        {mutant: (pid, log)} once Celery says each is ready."""
        started = {}
        for mutant in mutants:
            log = self.workdir / f"worker-{mutant}.log"
            started[mutant] = (spawn([sys.executable, "-m", "tests.mutants.jobs_workers", mutant, "--", "worker",
                                      "--concurrency", "1"], log=log, env=self.env, cwd=ROOT).pid, log)
            self.workers.append(started[mutant][0])
        for mutant, (pid, log) in started.items():
            wait_until(lambda: " ready." in log.read_text(errors="replace") or not alive(pid), timeout_s=120,
                       what=f"the {mutant} worker to start")
            assert alive(pid), log.read_text(errors="replace")[-3000:]
        return started


@pytest.fixture(scope="module")
def stack(trained_model_dir: Path, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from pipelines.registry import set_champion

    tmp = tmp_path_factory.mktemp("workers")
    set_champion(MODEL_NAME, register_model_dir(trained_model_dir, MODEL_NAME), reason="tests")
    overrides = {**SETTINGS, "DETOPS_JOBS_DATA_DIR": str(tmp / "jobs"), "MLFLOW_TRACKING_URI": mlflow_uri,
                 "DETOPS_CACHE_DIR": str(tmp / "cache")}
    store = JobStore(f"sqlite:///{tmp / 'jobs' / 'jobs.db'}")
    with detector_service(trained_model_dir, tmp, overrides=overrides) as server:
        stack = Stack(url=server.url, env={**service_env(tmp, overrides), "DETOPS_SERVE_MODEL_NAME": MODEL_NAME},
                      store=store, workdir=tmp)
        try:
            yield stack
        finally:
            for pid in stack.workers:
                stop(pid, sig=signal.SIGKILL, timeout_s=10)
            store.close()


# --------------------------------------------------------------------------- checks (shared with the mutants)
def readyz(stack: Stack) -> dict:
    response = httpx.get(stack.url + "/readyz", timeout=30)
    assert response.status_code == 200, response.text  # no worker never makes the instance unready
    return response.json()


def metric(stack: Stack, name: str) -> float:
    text = httpx.get(stack.url + "/metrics", timeout=30).text
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def check_counted(stack: Stack, expected: int, timeout_s: float = 2 * LEASE_S) -> dict:
    """/readyz and /metrics count `expected` live workers within `timeout_s`; the /readyz body."""
    seen: list[object] = []

    def counted() -> dict | None:
        body = readyz(stack)
        gauge = metric(stack, "detops_job_workers_alive")
        seen[:] = [body["job_workers"], gauge]
        return body if body["job_workers"]["alive"] == expected and gauge == expected else None

    try:
        return wait_until(counted, timeout_s=timeout_s, what="the count", interval_s=0.3)
    except AssertionError:
        raise AssertionError(f"/readyz and /metrics do not count {expected} live workers: {seen}") from None


def check_stops(pid: int, signalled_at: float, what: str) -> float:
    """The worker `pid` and its whole process group are gone within jobs.shutdown_grace_s + SLACK_S of
    `signalled_at` (time.monotonic()); returns how long it took."""
    def gone() -> bool:
        if alive(pid):
            return False
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False

    while not gone():
        if time.monotonic() - signalled_at > GRACE_S + SLACK_S:
            raise AssertionError(f"{what}: the worker {pid} still runs {GRACE_S + SLACK_S:.0f} s after SIGTERM "
                                 f"(grace {GRACE_S:.0f} s)")
        time.sleep(0.1)
    return time.monotonic() - signalled_at


def submit(stack: Stack, files: list[tuple[str, bytes]]) -> httpx.Response:
    return httpx.post(stack.url + "/jobs", files=[("images", f) for f in files], timeout=120)


def accepted(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def check_completed(stack: Stack, job_id: str, timeout_s: float = 120) -> None:
    """The job succeeded with one succeeded result row per image."""
    job = wait_until(lambda: (j := stack.store.get_job(job_id)) and j.status not in ("queued", "running") and j,
                     timeout_s=timeout_s, what=f"job {job_id} to finish")
    rows = stack.store.results(job_id)
    assert job.status == "succeeded", (job.status, job.error)
    assert sorted(r.index for r in rows) == list(range(job.total)) and {r.status for r in rows} == {"succeeded"}


def leased_pids(stack: Stack, job_id: str) -> set[int]:
    """The processes holding a lease on the job's images now."""
    with stack.store.engine.connect() as conn:
        owners = conn.execute(select(st.job_images.c.lease_owner).where(
            st.job_images.c.job_id == job_id, st.job_images.c.lease_owner.is_not(None))).scalars().all()
    return {int(owner.rsplit(":", 1)[1]) for owner in owners}


def big_pictures(n: int) -> list[tuple[str, bytes]]:
    picture = images.smooth_jpeg(1600, 1200)
    return [(f"p{i}.jpg", picture) for i in range(n)]


STOPS: list[tuple[str, float]] = []  # (state, seconds from SIGTERM to gone), printed at the end


# --------------------------------------------------------------------------- visible
def test_no_worker_is_named_jobs_still_accepted_and_a_started_worker_is_counted(stack: Stack) -> None:
    body = check_counted(stack, 0)
    assert body["ready"] and body["job_workers"]["consuming"] is False
    assert "no job worker is consuming" in body["job_workers"]["detail"]
    response = submit(stack, [(f"img{i}.jpg", images.jpeg(96, 72, seed=i)) for i in range(3)])
    job_id = accepted(response)  # durable: accepted with nobody to run it
    assert response.json()["workers_alive"] == 0 and response.headers["x-job-workers"] == "0"
    assert "no job worker is consuming" in response.json()["warning"]
    wait_until(lambda: (readyz(stack)["job_workers"]["oldest_queued_age_s"] or 0) >= 1
               and metric(stack, "detops_jobs_oldest_queued_age_seconds") >= 1, timeout_s=30,
               what="the queued job's age in /readyz and /metrics")
    assert stack.store.get_job(job_id).status == "queued"

    stack.start_worker()
    check_counted(stack, 1)
    check_completed(stack, job_id)
    wait_until(lambda: readyz(stack)["job_workers"]["oldest_queued_age_s"] is None
               and metric(stack, "detops_jobs_oldest_queued_age_seconds") == 0, timeout_s=30,
               what="no queued job left")
    again = submit(stack, [("one.jpg", images.jpeg(96, 72))])
    assert again.json()["workers_alive"] == 1 and again.json()["warning"] is None
    check_completed(stack, accepted(again))


# --------------------------------------------------------------------------- stop
def test_sigterm_stops_a_worker_in_every_state(stack: Stack) -> None:
    # Idle: the worker of the test above (or a new one).
    idle = stack.workers[-1] if stack.workers and alive(stack.workers[-1]) else stack.start_worker()
    os.kill(idle, signal.SIGTERM)  # to the main process, as Kubernetes and `kill PID` send it
    STOPS.append(("idle", check_stops(idle, time.monotonic(), "idle")))
    check_counted(stack, 0)  # a stopping worker deletes its heartbeat: no longer counted

    # Mid-chunk: SIGTERM while one of its pool processes holds a chunk's lease.
    first = stack.start_worker()
    job_id = accepted(submit(stack, big_pictures(40)))
    wait_until(lambda: leased_pids(stack, job_id) and stack.store.counts(job_id).processed >= 2, timeout_s=60,
               what="a chunk in flight", interval_s=0.01)
    os.kill(first, signal.SIGTERM)
    STOPS.append(("mid-chunk", check_stops(first, time.monotonic(), "mid-chunk")))
    assert stack.store.counts(job_id).processed < 40, "the job finished before the worker stopped"

    # After a recovered job: the next worker finishes that job, a kill -9 of one of its pool processes
    # mid-chunk on the way (recovered when the lease expires), then SIGTERM to its whole process group.
    second = stack.start_worker(concurrency=2)
    wait_until(lambda: leased_pids(stack, job_id) & {p.pid for p in _children(second)}, timeout_s=60,
               what="a chunk in flight on the second worker", interval_s=0.01)
    killed = next(iter(leased_pids(stack, job_id) & {p.pid for p in _children(second)}))
    os.kill(killed, signal.SIGKILL)
    check_completed(stack, job_id)  # nothing accepted was lost: every image succeeded, once
    os.killpg(second, signal.SIGTERM)
    STOPS.append(("after a recovered job (group)", check_stops(second, time.monotonic(), "after a recovered job")))


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


# --------------------------------------------------------------------------- the reported hang, mutants
def test_stuck_pool_still_stops_and_mutants_fail_the_worker_checks(stack: Stack) -> None:
    """`stuck_pool` (billiard's pool join stuck for good, the reported hang): the grace still stops the
    worker. Mutants: `no_heartbeat`, a live worker that is not counted; `no_grace`, the same stuck pool
    without the grace watch, which nothing stops. Their checks must fail. Started together (cost)."""
    started = stack.start_mutants("stuck_pool", "no_grace", "no_heartbeat")
    with pytest.raises(AssertionError, match="do not count 3 live workers"):
        check_counted(stack, 3)  # three idle workers, all consuming: the one without heartbeat is missed
    (stuck, _), (graceless, log) = started["stuck_pool"], started["no_grace"]
    signalled_at = time.monotonic()
    os.kill(stuck, signal.SIGTERM)
    os.kill(graceless, signal.SIGTERM)
    STOPS.append(("pool join stuck", check_stops(stuck, signalled_at, "stuck pool")))
    with pytest.raises(AssertionError, match="still runs"):
        check_stops(graceless, signalled_at, "no grace")
    assert "Warm shutdown" in log.read_text(errors="replace")  # it got the signal, and hangs in the pool's join
    for state, seconds in STOPS:
        print(f"SIGTERM -> gone: {state:32s} {seconds:5.1f} s (grace {GRACE_S:.0f} s)")
