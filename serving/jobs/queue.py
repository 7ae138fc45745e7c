"""The Celery application of the jobs, as both sides see it: the API publishes wake-ups with it, the
workers (serving/jobs/worker.py) consume them.

A message only says "job X has work": the job store is the source of truth. So messages are small
and idempotent, a lost one is replaced by the reaper, and a duplicate costs one empty claim. Late
acknowledgement with rejection on worker loss puts the message of a killed worker back in the
queue.
"""

from __future__ import annotations

import logging
import math
from functools import cache
from pathlib import Path

from celery import Celery
from kombu import Queue
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from serving.jobs.settings import JobsSettings, load_jobs_settings

PROCESS_TASK = "detops.jobs.process_chunk"
log = logging.getLogger(__name__)


class EmbeddedTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport polled every 0.2 s instead of 1 s (its `polling_interval`
    transport option would reach `create_engine` and fail)."""

    polling_interval = 0.2


def make_app(settings: JobsSettings) -> Celery:
    """The Celery app for these settings (broker from DETOPS_BROKER_URL, else the embedded file)."""
    cfg = settings.config
    url = settings.broker_url
    options: dict[str, object] = {}
    transport = None
    if settings.embedded_broker:
        url = url.removeprefix("sqla+")
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        options = {"connect_args": {"timeout": 60}}  # wait for SQLite's lock instead of failing
        transport = EmbeddedTransport
    elif url.startswith("redis"):
        # An unacknowledged message comes back after this long (a whole worker died): past any lease.
        options = {"visibility_timeout": int(cfg.lease_s * 2), "socket_connect_timeout": cfg.db_connect_timeout_s,
                   "socket_timeout": 30}
    elif url.startswith(("amqp", "pyamqp")):
        options = {"confirm_publish": True}  # a publish returns once the broker has the message
    app = Celery("detops", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Each pool process holds one message in reserve: the next chunk starts without a round trip
        # to the broker (measured +12 % images/s on 2 cores, docs/jobs.md). A reserved wake-up cannot
        # strand work: it is returned when its worker dies, and the reaper covers the rest.
        worker_prefetch_multiplier=2,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=cfg.queue,
        task_queues=[Queue(cfg.queue, durable=True)],
        task_time_limit=cfg.chunk_time_limit_s,
        broker_transport_options=options,
        broker_connection_timeout=cfg.db_connect_timeout_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


@cache
def default_app() -> Celery:
    """The app of this process's settings (params.yaml and the environment)."""
    return make_app(load_jobs_settings())


def wake_ups(total: int, settings: JobsSettings) -> int:
    """How many wake-ups a new job gets: one per chunk, at most jobs.parallel_chunks."""
    return max(1, min(settings.config.parallel_chunks, math.ceil(total / settings.config.chunk_size)))


def publish(app: Celery, job_id: str, queue: str, count: int = 1) -> bool:
    """Publish `count` wake-ups of a job; False (logged) when the broker cannot take them now: the
    job is already stored, and the reaper publishes again later."""
    try:
        for _ in range(count):
            app.send_task(PROCESS_TASK, args=[job_id], queue=queue, retry=True,
                          retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5,
                                        "interval_max": 0.5})
    except Exception as exc:  # kombu/amqp/redis raise their own connection errors
        log.warning("could not publish a wake-up of job %s (%s: %s); the reaper will", job_id,
                    type(exc).__name__, exc)
        return False
    return True


def purge_delivered(engine: object, older_than_s: float) -> int:
    """Delete the rows of messages the embedded broker already delivered (kombu's SQLAlchemy
    transport keeps them, marked invisible) that are older than `older_than_s`; how many."""
    from datetime import datetime, timedelta

    from sqlalchemy import text

    cutoff = datetime.now() - timedelta(seconds=older_than_s)  # kombu stamps local time
    with engine.begin() as conn:  # type: ignore[attr-defined]
        return conn.execute(text("DELETE FROM kombu_message WHERE visible = 0 AND timestamp < :cutoff"),
                            {"cutoff": cutoff}).rowcount
