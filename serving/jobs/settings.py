"""Where the jobs' state lives: server URLs and the webhook secret come only from the environment,
everything else from params.yaml `jobs:` (pipelines/config/jobs.py, DETOPS_JOBS_* overrides).

With no variable set, everything is embedded under `jobs.data_dir` (default ./jobs_store) on one
machine: the job store is a SQLite file, the broker is kombu's SQLAlchemy transport on another SQLite
file, images are files in a folder (docs/jobs.md says what that guarantees).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.config.jobs import JobsConfig
from serving.settings import load_jobs_config

DATABASE_URL_ENV = "DETOPS_DATABASE_URL"  # sqlite:///path.db or postgresql+psycopg://user@host/db
BROKER_URL_ENV = "DETOPS_BROKER_URL"  # redis://host:6379/0 or amqp://user:password@host:5672/vhost
OBJECT_STORE_URL_ENV = "DETOPS_OBJECT_STORE_URL"  # a folder, or an fsspec URL (s3://bucket/prefix)
WEBHOOK_SECRET_ENV = "DETOPS_WEBHOOK_SECRET"  # HMAC-SHA256 key of callback signatures


@dataclass(frozen=True)
class JobsSettings:
    """Everything the jobs routes and workers need to find their state."""

    config: JobsConfig
    database_url: str
    broker_url: str
    object_store_url: str
    webhook_secret: str | None

    @property
    def embedded_broker(self) -> bool:
        """Whether the broker is the embedded SQLite file (single machine, polled)."""
        return self.broker_url.startswith("sqla+sqlite")


def load_jobs_settings(environ: Mapping[str, str] | None = None) -> JobsSettings:
    """The settings from params.yaml and the environment; embedded defaults under jobs.data_dir."""
    environ = os.environ if environ is None else environ
    config = load_jobs_config(environ)
    data = Path(config.data_dir).resolve()
    return JobsSettings(
        config=config,
        database_url=environ.get(DATABASE_URL_ENV) or f"sqlite:///{data / 'jobs.db'}",
        broker_url=environ.get(BROKER_URL_ENV) or f"sqla+sqlite:///{data / 'broker.db'}",
        object_store_url=environ.get(OBJECT_STORE_URL_ENV) or str(data / "objects"),
        webhook_secret=environ.get(WEBHOOK_SECRET_ENV) or None,
    )
