"""What a tenant left behind, deleted: `detops purge --tenant T` (everything) and
`detops purge --expired` (what is older than each tenant's `retention_days`).

A tenant's traces are its jobs (rows, images in the object store, results) and its prediction-log
records with their kept images. Result-cache entries live only in the service workers' memory,
keyed by tenant, and are never served to anyone else; they go with LRU eviction or a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from monitoring.store import open_store
from pipelines.config.gateway import GatewayConfig
from serving.jobs.objects import open_object_store
from serving.jobs.settings import load_jobs_settings
from serving.jobs.store import JobStore, utcnow


@dataclass(frozen=True)
class Purged:
    tenant: str
    jobs: int
    predictions: int


def purge_tenant(tenant: str, prediction_log: str, *, older_than: timedelta | None = None) -> Purged:
    """Delete `tenant`'s jobs (cancelled first, objects, rows) and prediction records, all of them or
    those older than `older_than`."""
    settings = load_jobs_settings()
    store = JobStore(settings.database_url, connect_timeout_s=settings.config.db_connect_timeout_s)
    objects = open_object_store(settings.object_store_url)
    try:
        store.create_schema()
        ids = store.owner_job_ids(tenant, created_before=None if older_than is None else utcnow() - older_than)
        for job_id in ids:
            store.cancel(job_id)
            objects.delete_prefix(job_id)
        n_jobs = store.erase(ids)
    finally:
        store.close()
    n_predictions = open_store(prediction_log).delete_tenant(tenant, older_than)
    return Purged(tenant=tenant, jobs=n_jobs, predictions=n_predictions)


def purge_expired(cfg: GatewayConfig, prediction_log: str) -> list[Purged]:
    """Apply every tenant's retention (gateway.retention_days, or its own in gateway.tenants)."""
    settings = load_jobs_settings()
    store = JobStore(settings.database_url, connect_timeout_s=settings.config.db_connect_timeout_s)
    try:
        store.create_schema()
        tenants = set(store.owners()) | set(cfg.tenants)
    finally:
        store.close()
    predictions = open_store(prediction_log)
    tenants |= set(predictions.tenants()) if hasattr(predictions, "tenants") else set()
    return [purge_tenant(t, prediction_log, older_than=timedelta(days=cfg.policy(t).retention_days or cfg.retention_days))
            for t in sorted(tenants)]
