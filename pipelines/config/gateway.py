"""Section `gateway:`: access to the service (keys, scopes, tenants), limits and quotas, degradation
(circuit breaker, dependency checks, slow clients). Secrets never live here: the keys' pepper, the
database and the limits storage come from DETOPS_* environment variables (serving/gateway/)."""

from __future__ import annotations

from typing import ClassVar

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.config.base import Section


class TenantPolicy(BaseModel):
    """A tenant's quotas and retention; any field left out takes the section's default."""

    model_config = ConfigDict(extra="forbid")

    requests_per_s: int | None = Field(None, ge=1)  # per key of this tenant
    images_per_s: int | None = Field(None, ge=1)
    images_per_day: int | None = Field(None, ge=1)
    max_job_images: int | None = Field(None, ge=1)
    retention_days: float | None = Field(None, gt=0)


class GatewayConfig(Section):
    """Every field can be overridden by DETOPS_GATEWAY_<FIELD> (serving/settings.py)."""

    section: ClassVar[str] = "gateway"

    # Off only for local experiments: the service refuses to start without auth on a non-loopback address.
    auth: bool = True
    key_cache_ttl_s: float = Field(2.0, gt=0, le=60)  # a revoked key stops working within this on every worker
    # While the key database is down, a cached key keeps working this long past its TTL, then gets 503.
    key_outage_grace_s: float = Field(30.0, ge=0, le=60)
    # TCP peers whose X-Forwarded-For names the client (the deployment's own nginx, on loopback).
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    requests_per_s: int = Field(50, ge=1)  # per key
    images_per_s: int = Field(200, ge=1)  # per key
    images_per_day: int = Field(1_000_000, ge=1)  # per tenant (UTC day)
    max_job_images: int = Field(10_000, ge=1)  # per tenant and job (jobs.max_images_per_job still applies)
    retention_days: float = Field(30.0, gt=0)  # jobs, results, prediction records: `detops purge --expired`
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    breaker_failures: int = Field(5, ge=1)  # consecutive failed inferences that open the circuit
    breaker_reset_s: float = Field(10.0, gt=0)  # open this long, then one trial request
    dependency_check_s: float = Field(2.0, gt=0)  # how often /readyz's dependencies are probed (background)
    dependency_timeout_s: float = Field(0.5, gt=0)  # each probe's limit: /jobs answers 503 within ~1 s
    dependency_failures: int = Field(2, ge=1)  # consecutive failed probes before a dependency shows as down
    max_concurrent_uploads: int = Field(32, ge=1)  # per worker; more answers 503 at once
    body_timeout_s: float = Field(30.0, gt=0)  # longest wait for the next chunk of a request body

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or network (e.g. 127.0.0.1/32)") from None
        return value

    def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's quotas with the section's defaults filled in."""
        own = self.tenants.get(tenant, TenantPolicy())
        return TenantPolicy(requests_per_s=own.requests_per_s or self.requests_per_s,
                            images_per_s=own.images_per_s or self.images_per_s,
                            images_per_day=own.images_per_day or self.images_per_day,
                            max_job_images=own.max_job_images or self.max_job_images,
                            retention_days=own.retention_days or self.retention_days)
