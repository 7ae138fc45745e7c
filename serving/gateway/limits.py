"""Per-key rate limits and per-tenant quotas with the `limits` library (5.8).

Storage from DETOPS_LIMITS_STORAGE_URL: `memory://` by default (per worker process: fine for one
embedded worker, not shared), `redis://host:6379/N` in production, which every worker of both colours
shares, so a key's limit holds across the whole deployment. Fixed windows: requests and images per
second per key (each tenant may have its own rates), images per UTC day per tenant. Over a limit: `RequestRejected` 429 with the seconds
until the window resets (Retry-After). When the storage cannot be reached the limits fail open: a
down Redis must not take /detect down with it. That is never silent: each request let through
unlimited counts in `detops_rate_limits_fail_open_total` (/metrics), the first one of an outage is a
warning in the log, and /readyz's `rate_limits` says `enforced: false` until a limit is counted again.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Mapping

from limits import RateLimitItemPerDay, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from pipelines.config.gateway import GatewayConfig
from serving import metrics
from serving.imaging import RequestRejected

STORAGE_ENV = "DETOPS_LIMITS_STORAGE_URL"
log = logging.getLogger(__name__)


class Limits:
    """The limits of `gateway:` on one storage (see the module docstring)."""

    def __init__(self, cfg: GatewayConfig, environ: Mapping[str, str] | None = None) -> None:
        url = (os.environ if environ is None else environ).get(STORAGE_ENV, "memory://")
        self.cfg = cfg
        self.storage_url = url.split("@")[-1]  # never log a password
        self.limiter = FixedWindowRateLimiter(storage_from_string(url))
        self.failing_since: float | None = None  # wall time of the first failure of the current outage
        self.failure = ""
        # The quotas of a tenant, resolved once (a pydantic model built per request cost more than the hit).
        self.policy = functools.lru_cache(maxsize=4096)(cfg.policy)

    def report(self) -> dict[str, object]:
        """/readyz's `rate_limits`: whether they are enforced (False while their storage is failing)."""
        body: dict[str, object] = {"enforced": self.failing_since is None, "storage": self.storage_url}
        if self.failing_since is not None:
            body.update(failing_open_since=round(self.failing_since, 3), detail=self.failure)
        return body

    def _hit(self, item: object, ident: str, cost: int, code: str, what: str) -> None:
        try:
            allowed = self.limiter.hit(item, ident, cost=cost)  # type: ignore[arg-type]
            reset = 0.0 if allowed else self.limiter.get_window_stats(item, ident).reset_time  # type: ignore[arg-type]
        except Exception as exc:  # the storage is down: fail open, counted and reported
            metrics.RATE_LIMITS_FAIL_OPEN.inc()
            self.failure = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]
            if self.failing_since is None:
                self.failing_since = time.time()
                log.warning("rate-limit storage %s unavailable (%s): limits fail open until it answers again "
                            "(first one not enforced: %s)", self.storage_url, self.failure, what)
            return
        if self.failing_since is not None:
            log.info("rate-limit storage %s answers again: limits enforced", self.storage_url)
            self.failing_since = None
        if not allowed:
            retry = max(1, math.ceil(reset - time.time()))
            raise RequestRejected(code, f"{what}; retry after {retry} s", 429, retry_after=retry)

    def request(self, key_id: str, tenant: str) -> None:
        """Count one request of `key_id` (429 over the tenant's gateway.requests_per_s)."""
        rate = self.policy(tenant).requests_per_s
        self._hit(RateLimitItemPerSecond(rate, namespace="detops-req"), key_id, 1, "rate_limited",
                  f"over {rate} requests/s for this key (gateway.requests_per_s)")

    def images_now(self, key_id: str, tenant: str, n: int) -> None:
        """Count `n` images sent for synchronous detection by `key_id` (429 over gateway.images_per_s)."""
        rate = self.policy(tenant).images_per_s
        if n > rate:
            raise RequestRejected("rate_limited", f"{n} images in one request is over {rate} images/s for this key "
                                  "(gateway.images_per_s)", 429, retry_after=1)
        self._hit(RateLimitItemPerSecond(rate, namespace="detops-img"), key_id, n, "rate_limited",
                  f"over {rate} images/s for this key (gateway.images_per_s)")

    def images_today(self, tenant: str, n: int) -> None:
        """Count `n` images against the tenant's daily quota (429 `quota_exceeded`)."""
        per_day = self.policy(tenant).images_per_day
        self._hit(RateLimitItemPerDay(per_day, namespace="detops-day"), tenant, n, "quota_exceeded",
                  f"tenant {tenant!r} is over its quota of {per_day} images per day (gateway.images_per_day)")

    def job_size(self, tenant: str, n: int) -> None:
        """A job of `n` images must fit the tenant's job size (413 `job_too_large`)."""
        most = self.policy(tenant).max_job_images
        if n > most:
            raise RequestRejected("too_many_images", f"{n} images is over tenant {tenant!r}'s limit of {most} "
                                  "images per job (gateway.max_job_images)", 413)
