"""The gateway: one ASGI middleware in front of every route of the service (serving/service.py).

In order, for each HTTP request:
1. a request id (the client's `X-Request-Id` when it is sane, else a new one; echoed in the response)
   and, once known, the tenant are put in context for every log line (serving/gateway/context.py);
2. `/` and `/docs.json` answer detops' own documentation (serving/gateway/docs.py);
   `/readyz` answers JSON: ready (model loaded, circuit not open: else 503), each dependency, and the
   job workers (how many alive, the oldest queued job's age; none alive is named, not unready);
3. public routes (serving/gateway/scopes.py) pass; every other route needs a key: 401 without one or
   with an unknown or revoked one, 403 without the route's scope, then the key's request rate (429);
4. `/jobs` answers 503 + Retry-After at once while the background probe sees the job store down, and
   `POST /jobs` while it sees the broker down (reads of stored jobs still work then);
5. uploads: at most `gateway.max_concurrent_uploads` bodies are received at once per worker (more:
   503 + Retry-After at once), and a body whose next chunk takes over `gateway.body_timeout_s` is cut.

Authentication off (`gateway.auth: false`, e.g. DETOPS_GATEWAY_AUTH=false) is for local experiments
only: every request then runs as tenant `local`; a worker listening on a network address refuses to
start, and a request that arrives on a non-loopback address, or whose original client (the TCP peer,
or behind the deployment's nginx its `X-Forwarded-For`: serving/gateway/network.py) is not loopback,
is refused (503 `auth_disabled`): such a service cannot be used from the network.

`/readyz` also names the rate limits failing open (their storage unreachable: `rate_limits`), which
`/metrics` counts (`detops_rate_limits_fail_open_total`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from pipelines.config.gateway import GatewayConfig
from serving.gateway import context, network
from serving.gateway.breaker import OPEN, CircuitBreaker
from serving.gateway.keys import KeyCache, key_id_of
from serving.gateway.limits import Limits
from serving.gateway.readiness import DependencyMonitor
from serving.gateway.scopes import allows, is_public, required_scope
from serving.imaging import RequestRejected
from serving.jobs.store import StoreUnavailable

log = logging.getLogger("detops.access")
Scope = dict[str, Any]
Message = dict[str, Any]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UPLOAD_METHODS = ("POST", "PUT", "PATCH")


class GatewayState:
    """What the middleware and the service's handlers share in one worker process: settings, the key
    cache, the limits, the inference circuit breaker, the dependency monitor, and the documentation
    builders the service provides (`openapi`, `index`)."""

    def __init__(self, cfg: GatewayConfig, *, keys: Callable[[], KeyCache] | None, limits: Limits,
                 monitor: DependencyMonitor | None) -> None:
        self.cfg = cfg
        self._keys_factory = keys
        self._keys: KeyCache | None = None
        self.limits = limits
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self.monitor = monitor
        self.uploads = 0
        self.trusted_proxies = network.networks(cfg.trusted_proxies)
        self.openapi: Callable[[], dict[str, Any]] | None = None
        self.index: Callable[[], str] | None = None
        self._docs: tuple[bytes, bytes] | None = None

    def check(self) -> None:
        """At a worker's start: with auth on, the keys' pepper must be there; with auth off, the worker
        must listen on loopback only (DetopsError otherwise)."""
        if self.cfg.auth:
            _ = self.keys
        else:
            network.refuse_auth_off_exposed(self.cfg, network.listening_addresses(), "this service")

    @property
    def keys(self) -> KeyCache:
        if self._keys is None:
            assert self._keys_factory is not None
            self._keys = self._keys_factory()
        return self._keys

    def docs(self) -> tuple[bytes, bytes]:
        """(OpenAPI JSON, index HTML), built once per worker."""
        if self._docs is None:
            assert self.openapi is not None and self.index is not None
            self._docs = (json.dumps(self.openapi()).encode(), self.index().encode())
        return self._docs


class Gateway:
    """The ASGI middleware (see the module docstring); `state` is shared with the service."""

    def __init__(self, app: Callable[..., Any], state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _header(scope, b"x-request-id").decode("latin-1")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        context.REQUEST_ID.set(rid)
        context.TENANT.set("-")
        context.KEY_ID.set("-")
        send = _json_route_errors(_with_headers(send, [(b"x-request-id", rid.encode())]))
        started = time.perf_counter()
        status: list[int] = []
        try:
            await self._handle(scope, receive, _recording(send, status))
        finally:
            if scope["path"] not in ("/livez", "/readyz", "/metrics", "/healthz"):
                log.info("request", extra={"event": "request", "method": scope["method"], "path": scope["path"],
                                           "status": status[0] if status else 0,
                                           "ms": round((time.perf_counter() - started) * 1000, 1)})

    async def _handle(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        state, cfg = self.state, self.state.cfg
        path, method = scope["path"], scope["method"]
        if not cfg.auth and not self._loopback(scope):
            return await _error(send, 503, "auth_disabled", "authentication is off on this instance "
                                "(gateway.auth: false), which is allowed for loopback clients only")
        if method == "GET" and path in ("/", "/docs.json") and state.openapi is not None:
            spec, page = await asyncio.to_thread(state.docs)
            return await _send(send, 200, spec if path == "/docs.json" else page,
                               b"application/json" if path == "/docs.json" else b"text/html; charset=utf-8")
        if path == "/readyz":
            return await self._readyz(scope, receive, send)
        if is_public(path):
            return await self.app(scope, receive, send)
        try:
            await self._authorize(scope, method, path)
            if path.startswith("/jobs") and state.monitor is not None:
                if not state.monitor.is_up("job_store"):
                    raise RequestRejected("job_store_unavailable", "the job store is down (see /readyz); nothing "
                                          "was stored, retry later", 503, retry_after=5)
                if method == "POST" and not state.monitor.is_up("broker"):
                    raise RequestRejected("broker_unavailable", "the job broker is down (see /readyz); nothing was "
                                          "stored, retry later", 503, retry_after=5)
        except RequestRejected as exc:
            return await _error(send, exc.status, exc.code, exc.detail, exc.retry_after,
                                extra=[(b"www-authenticate", b"Bearer")] if exc.status == 401 else [])
        if method not in UPLOAD_METHODS:
            return await self.app(scope, receive, send)
        if state.uploads >= cfg.max_concurrent_uploads:
            return await _error(send, 503, "overloaded", f"{state.uploads} uploads are being received by this "
                                f"worker (gateway.max_concurrent_uploads); retry shortly", 1)
        state.uploads += 1
        try:
            await self.app(scope, _timed_receive(receive, cfg.body_timeout_s), send)
        finally:
            state.uploads -= 1

    def _loopback(self, scope: Scope) -> bool:
        """Whether the request arrived on a loopback address from a loopback client (the original
        client behind the deployment's nginx: serving/gateway/network.py)."""
        server = scope.get("server")
        if server and not network.loopback_address(server[0]):
            return False
        client = network.client_address(scope, self.state.trusted_proxies)
        return not client or network.loopback_address(client)

    async def _authorize(self, scope: Scope, method: str, path: str) -> None:
        cfg = self.state.cfg
        if not cfg.auth:
            context.TENANT.set(context.NO_AUTH_TENANT)
            context.KEY_ID.set("local")
            return
        key = _presented_key(scope)
        if not key:
            raise RequestRejected("missing_key", "this route needs an API key: header 'Authorization: Bearer <key>' "
                                  "or 'X-API-Key: <key>' (see / for how to get one)", 401)
        hit, found = self.state.keys.cached(key)
        try:
            if not hit:
                found = await asyncio.to_thread(self.state.keys.lookup, key)
        except StoreUnavailable:
            raise RequestRejected("auth_unavailable", "keys cannot be checked: the key database is down",
                                  503, retry_after=5) from None
        if found is None:
            context.KEY_ID.set(key_id_of(key) or "malformed")
            raise RequestRejected("invalid_key", "unknown or revoked API key", 401)
        context.TENANT.set(found.tenant)
        context.KEY_ID.set(found.key_id)
        needed = required_scope(method, path)
        if not allows(found.scopes, needed):
            raise RequestRejected("insufficient_scope", f"{method} {path} needs scope {needed!r}; this key has "
                                  f"{', '.join(sorted(found.scopes))}", 403)
        self.state.limits.request(found.key_id, found.tenant)

    async def _readyz(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        inner: list[int] = []

        async def swallow(message: Message) -> None:
            if message["type"] == "http.response.start":
                inner.append(message["status"])

        await self.app(scope, receive, swallow)
        loaded = bool(inner) and inner[0] == 200
        circuit = self.state.breaker.state
        ready = loaded and circuit != OPEN
        deps = self.state.monitor.report() if self.state.monitor is not None else {}
        body = {"ready": ready, "model_loaded": loaded, "circuit": circuit, "dependencies": deps,
                "rate_limits": self.state.limits.report()}
        if self.state.monitor is not None and self.state.monitor.consumers is not None:
            body["job_workers"] = self.state.monitor.consumers.report()  # none alive: named, still ready
        await _send(send, 200 if ready else 503, json.dumps(body).encode(), b"application/json")


def _presented_key(scope: Scope) -> str:
    auth = _header(scope, b"authorization").decode("latin-1").strip()
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return _header(scope, b"x-api-key").decode("latin-1").strip()


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return b""


def _with_headers(send: Callable[..., Any], headers: list[tuple[bytes, bytes]]) -> Callable[..., Any]:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)
    return wrapped


def _json_route_errors(send: Callable[..., Any]) -> Callable[..., Any]:
    """The router's own 404/405 (a path no route matches, e.g. an id with a newline) come as plain text:
    send them as the JSON error body every other error has, as the OpenAPI document promises."""
    replaced: list[bytes] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] in (404, 405):
            headers = dict(message.get("headers", []))
            if not headers.get(b"content-type", b"").startswith(b"application/json"):
                from serving.schemas import ErrorBody

                code, detail = (("not_found", "no such route or resource") if message["status"] == 404
                                else ("method_not_allowed", "this route does not take that method"))
                replaced.append(ErrorBody(error=code, detail=detail).model_dump_json().encode())
                kept = [(k, v) for k, v in message.get("headers", []) if k not in (b"content-type", b"content-length")]
                message = {**message, "headers": [*kept, (b"content-type", b"application/json"),
                                                  (b"content-length", str(len(replaced[0])).encode())]}
        elif message["type"] == "http.response.body" and replaced:
            if message.get("more_body", False):
                return  # the plain-text body is dropped; the JSON one goes with the last chunk
            message = {"type": "http.response.body", "body": replaced[0]}
        await send(message)
    return wrapped


def _recording(send: Callable[..., Any], status: list[int]) -> Callable[..., Any]:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        await send(message)
    return wrapped


def _timed_receive(receive: Callable[..., Any], timeout_s: float) -> Callable[..., Any]:
    """`receive` that gives up on a client whose next body chunk takes over `timeout_s` (a slow
    upload cannot hold a worker's upload slot forever): the app sees a disconnect."""
    async def wrapped() -> Message:
        try:
            return await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("request body stalled for %.0f s: dropped (gateway.body_timeout_s)", timeout_s)
            return {"type": "http.disconnect"}
    return wrapped


async def _send(send: Callable[..., Any], status: int, body: bytes, content_type: bytes,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Callable[..., Any], status: int, code: str, detail: str, retry_after: int | None = None,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    from serving.schemas import ErrorBody

    headers = list(extra or [])
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await _send(send, status, ErrorBody(error=code, detail=detail).model_dump_json().encode(), b"application/json",
                headers)
