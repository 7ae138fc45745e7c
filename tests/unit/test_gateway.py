"""The gateway's parts without a server: scopes, keys (real SQLite job store), the TTL cache and
revocation, limits (the `limits` library's memory storage), the circuit breaker, the dependency
monitor's hysteresis, the OpenAPI document, the JSON log line."""

from __future__ import annotations

import json
import logging
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

PEPPER = b"unit-test-pepper-0123456789"


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
    cache = KeyCache(keys, ttl_s=0.3)
    assert cache.lookup(key).key_id == record.key_id
    keys.revoke(record.key_id)
    assert cache.lookup(key) is not None  # within the TTL: the cached answer
    time.sleep(0.35)
    assert cache.lookup(key) is None  # after it: revoked everywhere
    _, other = keys.create("acme", "detect")
    assert cache.lookup(other) is not None
    time.sleep(0.35)
    keys.store = JobStore(f"postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_s=1)  # down
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
