"""The job workers: `detops worker`, or `celery -A serving.jobs.worker worker` (same app).

Each pool process handles one wake-up at a time: it claims the next chunk of the job's images in the
store (a lease of jobs.chunk_time_limit_s + jobs.lease_slack_s), reads them from the object store,
runs them as one batch through the shared model runtime (serving/jobs/engine.py), writes the results
insert-or-ignore and releases the lease, finishes the job when every image has a result, and
otherwise publishes the next wake-up. A message whose job is gone, finished or fully leased elsewhere
is acknowledged and dropped. Transient failures (database, object store, registry) are retried by
Celery with exponential backoff; a chunk over its time limit is killed by Celery, and its images come
back, one at a time, when their lease expires; an image that crashed or timed out its worker
jobs.max_attempts times is dead-lettered with its reason (serving/jobs/store.py `claim`).

The parent process of the pool runs a housekeeping thread: heartbeat, finishing jobs whose worker
died after their last result, new wake-ups for stalled jobs (expired leases, lost messages: the
reaper that makes the broker only a wake-up), and webhook deliveries (serving/jobs/webhooks.py).
The heartbeat (a `detops_workers` row, every jobs.reap_interval_s) is what the API counts as a live
worker (/readyz, /metrics, the 202 of POST /jobs); it is deleted as soon as the worker shuts down.

Stopping is bounded: SIGTERM (or SIGINT) starts Celery's warm shutdown (no new message; running
chunks finish), and a thread started with the worker kills the pool processes and exits the process
once jobs.shutdown_grace_s has passed, whatever Celery is waiting for. That wait can be forever:
billiard's plain pool (the one Celery uses with the embedded broker) shares locks between the parent
and its children, and a child killed while holding one (SIGKILL, or a SIGTERM sent to the whole
process group, mid-message) leaves it held, so the pool's join never returns (seen: the task
handler blocked on the result queue's write lock, and `Pool._help_stuff_finish` on the task queue's
read lock). A chunk cut short is not lost: its images are re-claimed when their lease expires.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from pipelines import environment

environment.configure()

from serving.jobs.engine import detect_encoded  # noqa: E402
from serving.jobs.models import LiveModel, Runtimes  # noqa: E402
from serving.jobs.objects import ObjectStore, get_many, open_object_store  # noqa: E402
from serving.jobs.queue import PROCESS_TASK, default_app, publish, purge_delivered  # noqa: E402
from serving.jobs.results import IMAGE_FAILED, ImageResult  # noqa: E402
from serving.jobs.settings import JobsSettings, load_jobs_settings  # noqa: E402
from serving.jobs.store import JobStore, StoreUnavailable  # noqa: E402
from serving.settings import load_serve_config  # noqa: E402

log = logging.getLogger(__name__)
DELIVERED_KEEP_S = 3600.0  # the embedded broker's delivered messages are deleted after an hour
app = default_app()
SETTINGS = load_jobs_settings()
CFG = SETTINGS.config


class Transient(Exception):
    """A failure worth retrying later (the registry could not be asked, for instance)."""


@dataclass
class _Process:
    """What one pool process keeps between tasks (created after the fork, on first use)."""

    store: JobStore
    objects: ObjectStore
    runtimes: Runtimes
    live: LiveModel
    worker_id: str
    max_pixels: int


_process: _Process | None = None


def process_context() -> _Process:
    global _process
    if _process is None or not _process.worker_id.endswith(f":{os.getpid()}"):
        store = JobStore(SETTINGS.database_url, connect_timeout_s=CFG.db_connect_timeout_s)
        _process = _Process(store=store, objects=open_object_store(SETTINGS.object_store_url),
                            runtimes=Runtimes(threads=CFG.worker_threads), live=LiveModel(CFG.model_check_interval_s),
                            worker_id=f"{socket.gethostname()}:{os.getpid()}",
                            max_pixels=load_serve_config().max_pixels)
    return _process


@worker_process_init.connect
def _preload(**_: Any) -> None:
    """Load the live version when a pool process starts, so that no chunk pays for it (nor runs
    into its time limit); a registry that cannot be asked now is asked again by the first task."""
    try:
        ctx = process_context()
        live = ctx.live.get()
        ctx.runtimes.get(live.name, live.version)
    except Exception as exc:
        log.warning("could not preload the live model (%s: %s); the first task will", type(exc).__name__, exc)


@app.task(name=PROCESS_TASK, bind=True, autoretry_for=(StoreUnavailable, Transient, OSError),
          retry_backoff=CFG.retry_backoff_s, retry_backoff_max=CFG.retry_backoff_max_s, retry_jitter=True,
          max_retries=CFG.max_retries)
def process_chunk(self: Any, job_id: str) -> str:
    """One wake-up of job `job_id`: at most one chunk of its images (see the module docstring)."""
    return run_chunk(process_context(), job_id)


def run_chunk(ctx: _Process, job_id: str) -> str:
    """Claim, detect, record, then finish the job or wake the next chunk; a word for the log."""
    from pipelines.registry import RegistryError
    from serving.runtime import InvalidParams

    try:
        live = ctx.live.get()
    except Exception as exc:
        raise Transient(f"cannot ask the registry which model version is live ({type(exc).__name__}: {exc})") from exc
    claim = ctx.store.claim(job_id, worker=ctx.worker_id, model_name=live.name, live_version=live.version,
                            chunk_size=CFG.chunk_size, lease_s=CFG.lease_s, max_attempts=CFG.max_attempts)
    if claim is None:
        return "no such active job"
    job = claim.job
    if claim.images:
        try:
            runtime, model_info = ctx.runtimes.get(job.model_name, job.model_version)
            params = runtime.resolve(**job.params)
        except (RegistryError, InvalidParams) as exc:
            ctx.store.fail_job(job_id, f"{job.model_name} v{job.model_version}: {exc}")
            return "failed"
        read = get_many(ctx.objects, [image.object_key for image in claim.images])
        missing = [image.index for image, data in zip(claim.images, read) if data is None]
        if missing:
            current = ctx.store.get_job(job_id)
            if current is None or current.deleted_at is not None:
                return "cancelled"
        found = [image.index for image, data in zip(claim.images, read) if data is not None]
        results = detect_encoded(runtime, [data for data in read if data is not None], found, params, model_info,
                                 max_bytes=CFG.max_image_bytes, max_pixels=ctx.max_pixels)
        results += [ImageResult(i, IMAGE_FAILED, error="image_missing", detail="the image is no longer in the object "
                                f"store ({ctx.objects.url})") for i in missing]
        if not ctx.store.record_results(job_id, ctx.worker_id, job.model_version, results):
            return "cancelled"
    if ctx.store.finish_if_complete(job_id) is not None:
        return "finished"
    if claim.images and ctx.store.has_claimable(job_id, CFG.max_attempts):
        if publish(app, job_id, CFG.queue):
            ctx.store.mark_woken(job_id)
    return f"{len(claim.images)} images"


# --------------------------------------------------------------------------- housekeeping
@dataclass
class Housekeeping:
    """The pool parent's thread: heartbeat, reaper and webhook deliveries (module docstring)."""

    settings: JobsSettings
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    broker_engine: Any = None
    version: str | None = None  # the live model version, as last asked

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="detops-housekeeping", daemon=True)
        self.thread.start()

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop the thread (its heartbeat row is deleted as it ends), waiting for it at most `wait_s`."""
        self.stopping.set()
        if self.thread is not None and wait_s > 0:
            self.thread.join(timeout=wait_s)

    def _run(self) -> None:
        from serving.jobs.schemas import job_summary
        from serving.jobs.webhooks import WebhookDispatcher

        cfg = self.settings.config
        store = JobStore(self.settings.database_url, connect_timeout_s=cfg.db_connect_timeout_s)
        live = LiveModel(cfg.model_check_interval_s)
        dispatcher = WebhookDispatcher(store, cfg, self.settings.webhook_secret,
                                       summary=lambda job_id: job_summary(store, store.get_job(job_id))
                                       .model_dump(mode="json"))
        tick = min(1.0, cfg.reap_interval_s)
        last_reap = -float("inf")
        schema_ready = False
        try:
            while not self.stopping.is_set():
                try:
                    if not schema_ready:
                        store.create_schema()
                        schema_ready = True
                    if time.monotonic() - last_reap >= cfg.reap_interval_s:
                        self._reap(store, live)
                        last_reap = time.monotonic()
                    dispatcher.dispatch()
                except Exception as exc:  # a database or broker outage: try again next tick
                    log.warning("housekeeping: %s: %s", type(exc).__name__, exc)
                self.stopping.wait(tick)
        finally:
            dispatcher.close()
            try:
                store.remove_worker(self.worker_id)
            except StoreUnavailable:
                pass
            store.close()

    def _reap(self, store: JobStore, live: LiveModel) -> None:
        cfg = self.settings.config
        # First, with the version known so far: a slow registry or broker must not make a live worker look dead.
        store.heartbeat(self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), model_version=self.version)
        if self.settings.embedded_broker:
            self._purge_broker()
        try:
            self.version = live.get().version
        except Exception:
            self.version = None
        for job_id in store.unfinished_complete_jobs():
            store.finish_if_complete(job_id)
        for job_id in store.stalled_jobs(reap_interval_s=cfg.reap_interval_s, requeue_after_s=cfg.requeue_after_s):
            log.info("job %s stalled (expired lease or lost message): waking it up again", job_id)
            publish(app, job_id, cfg.queue)


    def _purge_broker(self) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.exc import OperationalError

        if self.broker_engine is None:
            self.broker_engine = create_engine(self.settings.broker_url.removeprefix("sqla+"),
                                               connect_args={"timeout": 60})
        try:
            purge_delivered(self.broker_engine, DELIVERED_KEEP_S)
        except OperationalError:  # no message table yet
            pass


_housekeeping: Housekeeping | None = None


@worker_ready.connect
def _start_housekeeping(**_: Any) -> None:
    global _housekeeping
    _housekeeping = Housekeeping(SETTINGS)
    _housekeeping.start()


@worker_shutdown.connect
def _stop_housekeeping(**_: Any) -> None:
    if _housekeeping is not None:
        _housekeeping.stop()


# --------------------------------------------------------------------------- bounded shutdown
_shutting_down = threading.Event()


@worker_init.connect
def _start_grace_watch(**_: Any) -> None:
    """Start, with the worker, the thread that bounds its shutdown: started now rather than from the
    signal handler, which only sets an event (module docstring). SIGALRM keeps its default action (end
    the process): the thread's backstop, which needs no Python code to run."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    threading.Thread(target=_stop_within_grace, args=(CFG.shutdown_grace_s,), name="detops-shutdown-grace",
                     daemon=True).start()


@worker_shutting_down.connect
def _shutdown_began(**_: Any) -> None:
    _shutting_down.set()


def _stop_within_grace(grace_s: float) -> None:
    """Once the shutdown began: drop the heartbeat (this worker consumes nothing more), give Celery
    `grace_s` to finish, then kill the pool processes and exit (1) if it has not. Nothing here waits on
    a lock another thread may hold (no logging: a raw write), and should this thread not run again (the
    interpreter finalizing, the GIL held), the alarm armed first ends the process a second later."""
    import psutil

    _shutting_down.wait()
    deadline = time.monotonic() + grace_s
    signal.alarm(math.ceil(grace_s) + 1)
    if _housekeeping is not None:
        _housekeeping.stop(wait_s=0)
    time.sleep(max(0.0, deadline - time.monotonic()))
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    os.write(2, f"detops worker: still stopping {grace_s:g} s after the shutdown began (jobs.shutdown_grace_s): "
                f"killed its {len(children)} pool processes, exiting; their chunks come back when their leases "
                "expire\n".encode())
    os._exit(1)


def run_worker(*, concurrency: int | None = None, queues: list[str] | None = None, loglevel: str = "INFO") -> None:
    """Run a Celery worker of this app in the foreground: `concurrency` pool processes (default
    jobs.worker_concurrency, else the machine's cores) consuming `queues` (default jobs.queue)."""
    from serving.runtime import available_cores

    processes = concurrency or CFG.worker_concurrency or available_cores()
    app.worker_main(["worker", f"--loglevel={loglevel}", f"--concurrency={processes}", "--pool=prefork",
                     f"--queues={','.join(queues or [CFG.queue])}", f"--hostname=detops-{os.getpid()}@%h",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])
