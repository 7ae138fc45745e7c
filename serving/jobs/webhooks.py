"""Job webhooks: the `callback_url` of a job receives a POST with the job's summary when it finishes.

- Signed: `X-Detops-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>` with the secret
  of DETOPS_WEBHOOK_SECRET and `X-Detops-Timestamp: <unix seconds>` (a receiver checks both, and
  refuses old timestamps: `verify` below is the reference).
- At least once, one delivery id: a job ends once, and every POST of its end carries the same
  `X-Detops-Event-Id` (`delivery_id`: the job id). A POST the receiver took but whose answer never
  came back (a timeout, a worker killed before recording the delivery) is sent again with that id:
  a receiver acts once per id.
- Never against the network the service runs in: only the schemes of `jobs.webhook_schemes`, only
  hosts matching `jobs.webhook_allowed_hosts` (when set), and every address the host resolves to must
  be public unless `jobs.webhook_allow_private`. The check runs at submission (422) and again at each
  delivery, which then connects to the address it checked (no DNS rebinding in between) and follows
  no redirect.
- Durable and never in a worker's way: finishing a job writes a pending delivery into the job store
  (an outbox) in the same transaction; the housekeeping thread of each worker process's parent
  delivers due ones from a small thread pool, retries failures with exponential backoff up to
  `jobs.webhook_max_attempts`, then marks the delivery failed on the job.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from pipelines.config.jobs import JobsConfig
from pipelines.errors import DetopsError

SIGNATURE_HEADER = "X-Detops-Signature"
TIMESTAMP_HEADER = "X-Detops-Timestamp"
EVENT_ID_HEADER = "X-Detops-Event-Id"
log = logging.getLogger(__name__)


class CallbackRefused(DetopsError):
    """A callback URL the policy does not allow; the message says why."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value of `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: the signature matches the body and timestamp, and the timestamp is
    within `tolerance_s` of now (an old delivery replayed is refused)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP_HEADER.lower()])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), lowered.get(SIGNATURE_HEADER.lower(), ""))


def check_callback_url(url: str, cfg: JobsConfig) -> tuple[str, list[str]]:
    """(host, the addresses it resolves to) when `url` may be called; CallbackRefused naming the
    rule otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in cfg.webhook_schemes:
        raise CallbackRefused(f"callback_url: scheme {parts.scheme or '(none)'!r} is not allowed "
                              f"(jobs.webhook_schemes: {', '.join(cfg.webhook_schemes)})")
    host = parts.hostname
    if not host:
        raise CallbackRefused("callback_url: no host")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url: credentials in the URL are not allowed")
    if cfg.webhook_allowed_hosts and not any(fnmatch.fnmatch(host.lower(), p.lower())
                                             for p in cfg.webhook_allowed_hosts):
        raise CallbackRefused(f"callback_url: host {host!r} is not in jobs.webhook_allowed_hosts")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as exc:
        raise CallbackRefused(f"callback_url: cannot resolve {host!r} ({exc})") from None
    addresses = sorted({info[4][0] for info in infos})
    if not cfg.webhook_allow_private:
        for address in addresses:
            if not _public(address):
                raise CallbackRefused(f"callback_url: {host!r} resolves to {address}, a private, loopback or "
                                      "reserved address (jobs.webhook_allow_private is false)")
    return host, addresses


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def backoff_s(attempt: int, cfg: JobsConfig) -> float:
    """Wait before attempt `attempt + 1`: exponential from jobs.webhook_backoff_s, capped, jittered."""
    base = min(cfg.webhook_backoff_max_s, cfg.webhook_backoff_s * 2 ** (attempt - 1))
    return base * random.uniform(0.8, 1.2)


def delivery_id(payload: dict[str, Any]) -> str:
    """The id every POST of one job's end carries (`X-Detops-Event-Id`): the job id, since a job ends once."""
    return str(payload["job_id"])


def deliver(url: str, payload: dict[str, Any], *, secret: str, cfg: JobsConfig) -> str | None:
    """POST the signed payload once; None when the receiver answered 2xx, else what went wrong."""
    import httpx

    try:
        host, addresses = check_callback_url(url, cfg)
    except CallbackRefused as exc:
        return str(exc)
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    parts = urlsplit(url)
    address = addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port:
        netloc += f":{parts.port}"
    pinned = parts._replace(netloc=netloc).geturl()  # connect to the address that was checked
    headers = {"content-type": "application/json", "host": parts.netloc.rsplit("@", 1)[-1],
               "user-agent": "detops-webhooks", SIGNATURE_HEADER: sign(secret, timestamp, body),
               TIMESTAMP_HEADER: str(timestamp), EVENT_ID_HEADER: delivery_id(payload)}
    try:
        with httpx.Client(timeout=cfg.webhook_timeout_s, follow_redirects=False) as client:
            request = client.build_request("POST", pinned, content=body, headers=headers,
                                           extensions={"sni_hostname": host})  # TLS checks the name, not the IP
            response = client.send(request)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


class WebhookDispatcher:
    """Delivers the store's due webhooks from a small thread pool (the workers' housekeeping calls
    `dispatch` every tick)."""

    def __init__(self, store: Any, cfg: JobsConfig, secret: str | None, summary: Any, threads: int = 4) -> None:
        self.store = store
        self.cfg = cfg
        self.secret = secret
        self.summary = summary  # job id -> the payload (serving/jobs/api.py's job summary)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="detops-webhook")
        self.threads = threads
        self.in_flight: set[str] = set()

    def dispatch(self) -> int:
        """Start the due deliveries there is room for; how many were started."""
        free = self.threads - len(self.in_flight)
        if free <= 0:
            return 0
        lease = self.cfg.webhook_timeout_s * 2 + 5
        jobs = self.store.claim_webhooks(lease_s=lease, limit=free)
        for job in jobs:
            self.in_flight.add(job.job_id)
            self.pool.submit(self._deliver, job)
        return len(jobs)

    def _deliver(self, job: Any) -> None:
        try:
            if not self.secret:
                error: str | None = "DETOPS_WEBHOOK_SECRET is not set on the worker: cannot sign"
            else:
                error = deliver(job.callback_url, self.summary(job.job_id), secret=self.secret, cfg=self.cfg)
            attempt = job.webhook_attempts + 1
            retry = None if error is None or attempt >= self.cfg.webhook_max_attempts else backoff_s(attempt, self.cfg)
            if error is not None:
                log.warning("webhook of job %s, attempt %d: %s%s", job.job_id, attempt, error,
                            "" if retry is not None else "; giving up")
            self.store.webhook_attempted(job.job_id, delivered=error is None, error=error, retry_in_s=retry)
        except Exception:  # the lease expires and another tick retries
            log.exception("webhook delivery of job %s", job.job_id)
        finally:
            self.in_flight.discard(job.job_id)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
