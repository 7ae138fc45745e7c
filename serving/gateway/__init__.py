"""Everything between a client and the service's routes, in one place:

- `scopes.py`   which routes are public, which scope each other route needs;
- `keys.py`     API keys of tenants, stored as peppered hashes in the jobs database, cached briefly;
- `context.py`  the request's id and tenant, on every log line;
- `limits.py`   per-key rates and per-tenant quotas (`limits` library, memory or Redis);
- `breaker.py`  the circuit breaker around inference;
- `readiness.py` background probes of the job store and the broker (/readyz body, fast 503s), and
                the job workers' heartbeats (/readyz, /metrics, the 202 of POST /jobs);
- `docs.py`     the API's own OpenAPI 3.1 document and page;
- `middleware.py` the ASGI middleware that applies all of it;
- `logs.py`     structured JSON access logs.

`build_state()` assembles them for one worker process from `gateway:` (params.yaml,
DETOPS_GATEWAY_*) and the DETOPS_* secrets in the environment.
"""

from __future__ import annotations

from pipelines.config.gateway import GatewayConfig
from serving.gateway.keys import KeyCache, KeyStore, pepper
from serving.gateway.limits import Limits
from serving.gateway.middleware import GatewayState
from serving.gateway.readiness import DependencyMonitor, JobConsumers, tcp_probe


_current: GatewayState | None = None


def current() -> GatewayState:
    """This process's gateway (built from the settings on first use, unless the service built it)."""
    global _current
    if _current is None:
        from serving.settings import load_gateway_config

        _current = build_state(load_gateway_config())
    return _current


def build_state(cfg: GatewayConfig) -> GatewayState:
    """The gateway of this process. Nothing is connected or checked here (importing the service, e.g.
    for `bentoml build`, needs no secret): the service calls `GatewayState.check()` when a worker starts."""
    from serving.jobs.settings import load_jobs_settings
    from serving.jobs.store import JobStore

    settings = load_jobs_settings()
    timeout = cfg.dependency_timeout_s
    store = JobStore(settings.database_url, connect_timeout_s=max(1, int(round(timeout))))

    def probe_store() -> None:
        with store._read() as conn:
            conn.exec_driver_sql("SELECT 1")

    from serving import metrics

    lease_s = settings.config.worker_lease_s
    schema_ready: list[bool] = []

    def read_consumers() -> tuple[int, object]:
        if not schema_ready:  # a store no worker has used yet has no heartbeat table: that is 0 workers
            store.create_schema()
            schema_ready.append(True)
        return store.consumers(lease_s)

    consumers = JobConsumers(read_consumers, lease_s=lease_s, on_read=metrics.observe_job_consumers)
    monitor = DependencyMonitor({"job_store": probe_store, "broker": tcp_probe(settings.broker_url, timeout)},
                                interval_s=cfg.dependency_check_s, failures_to_down=cfg.dependency_failures,
                                consumers=consumers)
    keys = (lambda: KeyCache(KeyStore(store, pepper()), cfg.key_cache_ttl_s, cfg.key_outage_grace_s)) if cfg.auth else None
    global _current
    _current = GatewayState(cfg, keys=keys, limits=Limits(cfg), monitor=monitor)
    return _current
