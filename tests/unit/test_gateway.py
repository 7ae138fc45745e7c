"""The gateway's parts without a server: scopes, keys (real SQLite job store), the TTL cache and
revocation, limits (the `limits` library's memory storage), the circuit breaker, the dependency
monitor's hysteresis, the OpenAPI document, the JSON log line; the access guarantees through the
real ASGI middleware in process (the outage grace of cached keys, the client address behind the
front door, rate limits failing open, authentication off on a network address), each also run with
its mutant from tests/mutants/access.py, which must make it fail."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from pipelines.config.gateway import GatewayConfig, TenantPolicy
from pipelines.errors import DetopsError
from serving.gateway import scopes
from serving.gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from serving.gateway.keys import KeyCache, KeyStore, hash_key, key_id_of, pepper
from serving.gateway.limits import Limits
from serving.gateway.readiness import DependencyMonitor
from serving.imaging import RequestRejected
from serving.jobs.store import JobStore, StoreUnavailable
from tests.mutants.access import (
    auth_off_exposure_unchecked,
    forwarded_for_from_any_peer,
    key_cache_without_grace,
    rate_limits_fail_open_silently,
)

PEPPER = b"unit-test-pepper-0123456789"
DOWN_DATABASE = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # nothing listens on port 1: refused at once


@pytest.fixture()
def keys(tmp_path: Path) -> KeyStore:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    return KeyStore(store, PEPPER)


def test_scopes() -> None:
    assert scopes.is_public("/readyz") and scopes.is_public("/docs.json") and scopes.is_public("/static_content/x.js")
    assert not scopes.is_public("/detect") and not scopes.is_public("/jobs")
    assert scopes.required_scope("POST", "/detect") == "detect"
    assert scopes.required_scope("POST", "/jobs") == "jobs:write"
    assert scopes.required_scope("GET", "/jobs/abc/results") == "jobs:read"
    assert scopes.required_scope("DELETE", "/jobs/abc") == "jobs:write"
    assert scopes.required_scope("GET", "/schema.json") == "admin"  # unknown routes: admin only
    assert scopes.allows(frozenset({"admin"}), "jobs:write") and not scopes.allows(frozenset({"detect"}), "jobs:read")
    with pytest.raises(ValueError, match="unknown"):
        scopes.parse_scopes("detect,root")


def test_keys_are_stored_hashed_and_revocable(keys: KeyStore, tmp_path: Path) -> None:
    record, key = keys.create("acme", "detect,jobs:read", "ci")
    assert key_id_of(key) == record.key_id and record.scopes == {"detect", "jobs:read"}
    raw = (tmp_path / "jobs.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("jobs.db-*"))
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw  # only the hash is stored
    assert hash_key(key, PEPPER).encode() in raw
    assert keys.lookup(key).tenant == "acme"
    assert keys.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert KeyStore(keys.store, b"another-pepper-0123456").lookup(key) is None  # the pepper is part of the hash
    keys.revoke(record.key_id)
    assert keys.lookup(key) is None
    assert [k.revoked_at is not None for k in keys.list("acme")] == [True]
    with pytest.raises(DetopsError, match="no key"):
        keys.revoke("000000000000")
    with pytest.raises(DetopsError, match="tenant"):
        keys.create("Bad Tenant!", "detect")


def test_key_cache_ttl_and_database_down(keys: KeyStore, tmp_path: Path) -> None:
    record, key = keys.create("acme", "detect")
    cache = KeyCache(keys, ttl_s=0.3, grace_s=30)
    assert cache.lookup(key).key_id == record.key_id
    keys.revoke(record.key_id)
    assert cache.lookup(key) is not None  # within the TTL: the cached answer
    assert cache.cached(key) == (True, cache.lookup(key))  # what the gateway asks first, without a thread
    time.sleep(0.35)
    assert cache.cached(key) == (False, None)  # past the TTL only the database can tell
    assert cache.lookup(key) is None  # after it: revoked everywhere
    assert cache.cached(key) == (True, None)
    _, other = keys.create("acme", "detect")
    assert cache.lookup(other) is not None
    time.sleep(0.35)
    keys.store = JobStore(DOWN_DATABASE, connect_timeout_s=1)  # down
    keys._schema_ready = True
    assert cache.lookup(other) is not None  # known key: its last answer while the database is down
    _, never_seen = KeyStore(JobStore(f"sqlite:///{tmp_path / 'jobs.db'}"), PEPPER).create("acme", "detect")
    with pytest.raises(StoreUnavailable):
        cache.lookup(never_seen)


def test_pepper_comes_from_the_environment() -> None:
    with pytest.raises(DetopsError, match="DETOPS_KEY_PEPPER"):
        pepper({"DETOPS_KEY_PEPPER": "short"})
    assert pepper({"DETOPS_KEY_PEPPER": "x" * 16}) == b"x" * 16


def test_limits() -> None:
    cfg = GatewayConfig(requests_per_s=3, images_per_s=5, images_per_day=8, max_job_images=4,
                        tenants={"big": TenantPolicy(max_job_images=100, images_per_day=1000, requests_per_s=20,
                                                 images_per_s=10)})
    lim = Limits(cfg, environ={})
    for _ in range(3):
        lim.request("k1", "t")
    with pytest.raises(RequestRejected) as over:
        lim.request("k1", "t")
    assert over.value.status == 429 and over.value.retry_after >= 1
    lim.request("k2", "t")  # per key
    with pytest.raises(RequestRejected, match="images/s"):
        lim.images_now("k3", "t", 6)
    for _ in range(10):
        lim.request("k4", "big")  # the tenant's own rate
    lim.images_now("k4", "big", 6)
    lim.images_today("t", 8)
    with pytest.raises(RequestRejected) as quota:
        lim.images_today("t", 1)
    assert quota.value.code == "quota_exceeded" and quota.value.retry_after >= 1
    lim.images_today("big", 900)
    with pytest.raises(RequestRejected) as size:
        lim.job_size("t", 5)
    assert size.value.status == 413
    lim.job_size("big", 100)


def test_limits_fail_open_when_the_storage_is_down(caplog: pytest.LogCaptureFixture) -> None:
    lim = Limits(GatewayConfig(requests_per_s=1), environ={"DETOPS_LIMITS_STORAGE_URL": "redis://127.0.0.1:1/0"})
    with caplog.at_level(logging.WARNING):
        lim.request("k", "t")
        lim.request("k", "t")  # over the limit, but nothing can count it: allowed, and said
    assert "not enforced" in caplog.text


def test_circuit_breaker_opens_and_closes_by_itself() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=0.2)
    breaker.before()
    breaker.failed()
    assert breaker.state == CLOSED
    breaker.failed()
    assert breaker.state == OPEN
    with pytest.raises(RequestRejected) as fast:
        breaker.before()
    assert fast.value.status == 503 and fast.value.code == "circuit_open" and fast.value.retry_after >= 1
    time.sleep(0.25)
    assert breaker.state == HALF_OPEN
    breaker.before()  # the trial
    with pytest.raises(RequestRejected):
        breaker.before()  # only one trial at a time
    breaker.failed()
    assert breaker.state == OPEN
    time.sleep(0.25)
    breaker.before()
    breaker.succeeded()
    assert breaker.state == CLOSED
    breaker.before()


def test_dependency_monitor_does_not_flap() -> None:
    outcomes = iter([None, RuntimeError("down"), None, RuntimeError("down"), RuntimeError("down"), None])

    def probe() -> None:
        result = next(outcomes)
        if result is not None:
            raise result

    monitor = DependencyMonitor({"job_store": probe}, interval_s=60, failures_to_down=2)
    seen = []
    for _ in range(6):
        monitor.check_once()
        seen.append(monitor.is_up("job_store"))
    assert seen == [True, True, True, True, False, True]
    assert monitor.report()["job_store"] == {"up": True, "detail": "ok"}


def test_openapi_document_is_valid_31(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import schemathesis

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    from serving.gateway.docs import api_description, index_page, openapi_document
    from serving.service import Detector

    doc = openapi_document(Detector.openapi_spec.asdict(), model_version="7",
                           description=api_description(model="m", model_version="7", limits={"x": "1"}, auth=True))
    text = json.dumps(doc)
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == "7"
    for boilerplate in ("BentoML Team", "Machine Learning Service created with BentoML", "https://", '"file"'):
        assert boilerplate not in text, boilerplate
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 10
    for op in operations:
        if op.path in ("/livez", "/readyz", "/metrics"):
            continue
        assert op.definition.raw["security"], op.label
        for code in ("401", "403", "429", "503"):
            assert code in op.definition.raw["responses"], (op.label, code)
    page = index_page("detops", "<p>x</p>")
    assert "http://" not in page and "https://" not in page and "persistAuthorization" in page


def test_json_log_lines_carry_request_context() -> None:
    from serving.gateway import context
    from serving.gateway.logs import JsonFormatter

    context.REQUEST_ID.set("r1")
    context.TENANT.set("acme")
    record = logging.LogRecord("detops.access", logging.INFO, "", 0, "request", (), None)
    record.path = "/detect"
    context.RequestContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r1" and line["tenant"] == "acme" and line["path"] == "/detect"


def _asgi(state, scope_extra: dict, body_chunks: list[bytes] | None = None, delay_s: float = 0.0) -> tuple[int, dict]:
    """Run one request through the Gateway middleware in front of an app that reads the whole body."""
    import asyncio

    from serving.gateway.middleware import Gateway

    seen: dict = {}

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["disconnected"] = True
                break
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = list(body_chunks or [b""])

    async def receive() -> dict:
        await asyncio.sleep(delay_s)
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif message["type"] == "http.response.body":
            seen["response"] = seen.get("response", b"") + message.get("body", b"")

    scope = {"type": "http", "method": "POST", "path": "/detect", "headers": [], "server": ("127.0.0.1", 3000),
             "client": ("127.0.0.1", 5555), **scope_extra}
    asyncio.run(Gateway(app, state)(scope, receive, send))
    return statuses[0], seen


def _state(**cfg: object):  # noqa: ANN202
    from serving.gateway.middleware import GatewayState

    return GatewayState(GatewayConfig(auth=False, **cfg), keys=None, limits=Limits(GatewayConfig(), environ={}),
                        monitor=None)


def test_auth_off_serves_loopback_only() -> None:
    assert _asgi(_state(), {})[0] == 200
    assert _asgi(_state(), {"server": ("10.1.2.3", 3000)})[0] == 503  # bound to a network address
    assert _asgi(_state(), {"client": ("192.168.0.9", 4000)})[0] == 503  # a client from the network


def _forwarded(peer: str, forwarded_for: str | None) -> int:
    headers = [(b"x-forwarded-for", forwarded_for.encode())] if forwarded_for is not None else []
    return _asgi(_state(), {"client": (peer, 4000), "headers": headers})[0]


def check_forwarded_for_is_believed_from_the_front_door_only() -> None:
    """Authentication off: the original client behind the loopback nginx is judged, not nginx; a client
    on the network cannot pass for loopback by sending the header itself."""
    assert _forwarded("127.0.0.1", None) == 200  # a local client, no front door
    assert _forwarded("127.0.0.1", "127.0.0.1") == 200  # a local client through the front door
    assert _forwarded("127.0.0.1", "203.0.113.9") == 503  # a network client through the front door
    assert _forwarded("127.0.0.1", "203.0.113.9, 127.0.0.1") == 503  # the right-most untrusted hop counts
    assert _forwarded("::1", "not-an-address") == 503
    assert _forwarded("203.0.113.9", "127.0.0.1") == 503, "a network peer's X-Forwarded-For was believed"
    assert _forwarded("10.0.0.7", "127.0.0.1, ::1") == 503, "a network peer's X-Forwarded-For was believed"


def test_forwarded_for_is_believed_from_the_front_door_only() -> None:
    check_forwarded_for_is_believed_from_the_front_door_only()


def test_forwarded_for_from_any_peer_is_caught() -> None:
    with forwarded_for_from_any_peer(), pytest.raises(AssertionError, match="was believed"):
        check_forwarded_for_is_believed_from_the_front_door_only()


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="no nginx")
def test_the_front_door_replaces_a_client_sent_forwarded_for(tmp_path: Path) -> None:
    """The real nginx of the deployment (its generated configuration) forwards the address it accepted,
    replacing whatever the client sent, so a colour sees the client and never a forged chain."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from deploy import nginx
    from pipelines import processes

    seen: list[str | None] = []

    class Colour(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.headers.get("X-Forwarded-For"))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    colour = ThreadingHTTPServer((processes.HOST, 0), Colour)
    threading.Thread(target=colour.serve_forever, daemon=True).start()
    port = processes.free_port()
    nginx.write_config(nginx.render(host=processes.HOST, port=port, blue_port=colour.server_address[1],
                                    green_port=processes.free_port(), prefix=tmp_path, canary_percent=10,
                                    max_body_bytes=1 << 20, timeout_s=10), tmp_path)
    pid = nginx.start(tmp_path, url=f"http://{processes.HOST}:{port}/")
    try:
        seen.clear()
        response = httpx.get(f"http://{processes.HOST}:{port}/x", headers={"X-Forwarded-For": "203.0.113.9"})
        assert response.status_code == 200
    finally:
        processes.stop(pid)
        colour.shutdown()
    assert seen == ["127.0.0.1"]  # the address nginx accepted (this test's), not the client's claim


def check_cached_key_stops_after_ttl_plus_grace(keys: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key revoked just before the key database went down keeps working for its TTL plus
    gateway.key_outage_grace_s, then gets 503 auth_unavailable, through the real middleware; the
    cache's clock is moved by hand (no waiting)."""
    from types import SimpleNamespace

    from serving.gateway import keys as keys_module
    from serving.gateway.middleware import GatewayState

    clock = [1000.0]
    monkeypatch.setattr(keys_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    record, key = keys.create("acme", "detect")
    cache = KeyCache(keys, ttl_s=2, grace_s=30)
    state = GatewayState(GatewayConfig(), keys=lambda: cache, limits=Limits(GatewayConfig(), environ={}), monitor=None)
    auth = {"headers": [(b"authorization", f"Bearer {key}".encode())]}

    def answer(at: float) -> tuple[int, str]:
        clock[0] = at
        status, seen = _asgi(state, auth)
        return status, json.loads(seen["response"]).get("error", "") if status != 200 else ""

    assert answer(1000) == (200, "")  # looked up and cached until 1002
    keys.revoke(record.key_id)
    alive = keys.store
    keys.store = JobStore(DOWN_DATABASE, connect_timeout_s=1)  # the key database goes down
    assert answer(1001) == (200, "")  # within the TTL
    assert answer(1031.5) == (200, "")  # past the TTL, within the grace: the last answer
    assert answer(1032.5) == (503, "auth_unavailable"), "a cached key outlived its TTL plus the grace"
    assert answer(5000) == (503, "auth_unavailable"), "a cached key outlived its TTL plus the grace"
    keys.store = alive  # back: the revocation is seen
    assert answer(5001) == (401, "invalid_key")


def test_cached_key_stops_after_ttl_plus_grace(keys: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    check_cached_key_stops_after_ttl_plus_grace(keys, monkeypatch)


def test_key_cache_without_grace_is_caught(keys: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with key_cache_without_grace(), pytest.raises(AssertionError, match="outlived"):
        check_cached_key_stops_after_ttl_plus_grace(keys, monkeypatch)


def check_rate_limits_failing_open_are_counted_and_named() -> None:
    """Limits whose storage is unreachable let requests through, and say so: each one counts in
    /metrics (detops_rate_limits_fail_open_total), /readyz's rate_limits is `enforced: false`."""
    from prometheus_client import REGISTRY

    from serving.gateway.middleware import GatewayState

    def counted() -> float:
        return REGISTRY.get_sample_value("detops_rate_limits_fail_open_total") or 0.0

    lim = Limits(GatewayConfig(requests_per_s=1), environ={"DETOPS_LIMITS_STORAGE_URL": "redis://127.0.0.1:1/0"})
    state = GatewayState(GatewayConfig(auth=False), keys=None, limits=lim, monitor=None)
    before = counted()
    lim.request("k", "t")
    lim.request("k", "t")  # over the limit, but nothing can count it: let through
    assert counted() - before == 2, "requests let through unlimited were not counted in /metrics"
    status, seen = _asgi(state, {"method": "GET", "path": "/readyz"})
    report = json.loads(seen["response"])["rate_limits"] if status == 200 else {}
    assert report.get("enforced") is False and "redis://127.0.0.1:1/0" == report.get("storage"), report
    assert "ConnectionError" in report.get("detail", ""), report


def test_rate_limits_failing_open_are_counted_and_named() -> None:
    check_rate_limits_failing_open_are_counted_and_named()


def test_rate_limits_failing_open_silently_is_caught() -> None:
    with rate_limits_fail_open_silently(), pytest.raises(AssertionError, match="not counted"):
        check_rate_limits_failing_open_are_counted_and_named()


def _refusal(call) -> str:  # noqa: ANN001
    try:
        call()
    except DetopsError as exc:
        return str(exc)
    raise AssertionError("authentication off on a network address was not refused")


def check_auth_off_is_refused_on_a_network_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service worker that listens on a network address refuses to start with authentication off
    (the real sockets of this process); `detops deploy up` refuses a front door on one (deploy.host),
    in one line and before it starts anything."""
    import socket

    import yaml
    from typer.testing import CliRunner

    from pipelines.cli.main import app
    from pipelines.config.base import PARAMS_ENV

    with socket.socket() as exposed:
        exposed.bind(("0.0.0.0", 0))
        exposed.listen()
        message = _refusal(_state().check)
    assert "listens on 0.0.0.0" in message and "\n" not in message, message
    _state().check()  # nothing on a network address any more: allowed

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["deploy"].update(host="0.0.0.0", state_dir=str(tmp_path / "state"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv(PARAMS_ENV, str(tmp_path / "params.yaml"))
    monkeypatch.setenv("DETOPS_GATEWAY_AUTH", "false")
    refused = CliRunner().invoke(app, ["deploy", "up"])
    assert refused.exit_code == 1, refused.output
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "deploy.host" in lines[0] and "0.0.0.0" in lines[0], refused.output
    assert not (tmp_path / "state").exists()  # nothing was started or written


def test_auth_off_is_refused_on_a_network_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_auth_off_is_refused_on_a_network_address(tmp_path, monkeypatch)


def test_auth_off_exposure_unchecked_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with auth_off_exposure_unchecked(), pytest.raises(AssertionError, match="not refused"):
        check_auth_off_is_refused_on_a_network_address(tmp_path, monkeypatch)


def test_a_stalled_body_is_cut_and_uploads_are_bounded() -> None:
    status, seen = _asgi(_state(body_timeout_s=0.05), {}, [b"a", b"b"], delay_s=0.2)
    assert status == 200 and seen.get("disconnected")  # the app saw a disconnect, not a hang
    state = _state(max_concurrent_uploads=1)
    state.uploads = 1  # one upload already being received by this worker
    assert _asgi(state, {})[0] == 503


def test_the_routers_plain_text_404_becomes_the_json_error_body() -> None:
    import asyncio

    from serving.gateway.middleware import _json_route_errors

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def router_404(status: int, content_type: bytes) -> None:
        wrapped = _json_route_errors(send)
        await wrapped({"type": "http.response.start", "status": status,
                       "headers": [(b"content-type", content_type), (b"content-length", b"9")]})
        await wrapped({"type": "http.response.body", "body": b"Not", "more_body": True})
        await wrapped({"type": "http.response.body", "body": b" Found"})

    asyncio.run(router_404(404, b"text/plain; charset=utf-8"))
    headers = dict(sent[0]["headers"])
    body = b"".join(m["body"] for m in sent[1:])
    assert headers[b"content-type"] == b"application/json" and int(headers[b"content-length"]) == len(body)
    assert json.loads(body)["error"] == "not_found" and len(sent) == 2
    sent.clear()  # a JSON 404 (a job that does not exist) passes untouched
    asyncio.run(router_404(404, b"application/json"))
    assert [m.get("body") for m in sent[1:]] == [b"Not", b" Found"]
