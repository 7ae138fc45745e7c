"""Access, tenancy and degradation against a real service: `bentoml serve` with authentication on,
the jobs database on PostgreSQL behind a TCP proxy that can be cut, a Redis server of the test's own
(broker and rate limits) behind another, keys created with the `detops keys` CLI. Then
401/403/404/429, tenant isolation, revocation while running, purge, a log scan, each degraded mode
(a cached key's outage grace running out, rate limits failing open, shown in /readyz and /metrics),
and Schemathesis over every operation. The service is the product's, served through
tests/failing_service.py, whose runtime fails while a file exists (the circuit breaker's fault)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipelines.processes import HOST
from tests.jobs_services import TcpProxy, job_env, postgres_database, redis_server, wait_until
from tests.serving_process import TEST_PEPPER, detector_service, synthetic_jpegs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY_TTL_S, KEY_GRACE_S = 1, 10  # a cached key answers for at most 11 s of a key-database outage


class Stack:
    def __init__(self, url: str, env: dict[str, str], workdir: Path, db: TcpProxy, broker: TcpProxy,
                 log: Path) -> None:
        self.url, self.env, self.workdir, self.db, self.broker, self.log = url, env, workdir, db, broker, log
        self.keys: dict[str, str] = {}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"detops {' '.join(args)} failed: {done.stderr}")
        return done

    def key(self, tenant: str, scopes: str) -> str:
        out = self.cli("keys", "create", "--tenant", tenant, "--scopes", scopes).stdout
        key = out.strip().splitlines()[-1]
        assert re.fullmatch(r"dtk_[0-9a-f]{12}_\S+", key), out
        self.keys[key] = tenant
        return key

    def call(self, method: str, route: str, key: str | None = None, *, header: str = "bearer",
             **kwargs: object) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[arg-type]
        if key is not None:
            headers.update({"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key})
        return httpx.request(method, self.url + route, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("access")
    fault = tmp / "inference-fault"
    with postgres_database() as db_url, redis_server(tmp / "redis") as redis:
        db = TcpProxy(HOST, 5432)
        broker = TcpProxy(HOST, int(redis.url.rsplit(":", 1)[1].split("/")[0]))  # broker and rate limits
        env = job_env({"DETOPS_KEY_PEPPER": TEST_PEPPER, "DETOPS_JOBS_DATA_DIR": str(tmp / "jobs"),
                       "DETOPS_SERVE_PREDICTION_LOG": str(tmp / "predictions"),
                       "DETOPS_LIMITS_STORAGE_URL": f"redis://{HOST}:{broker.port}/1"},
                      database_url=db_url.replace("127.0.0.1:5432", f"{HOST}:{db.port}"),
                      broker_url=f"redis://{HOST}:{broker.port}/0", object_store_url=str(tmp / "objects"))
        overrides = {**env, "DETOPS_GATEWAY_AUTH": "true", "DETOPS_GATEWAY_KEY_CACHE_TTL_S": str(KEY_TTL_S),
                     "DETOPS_GATEWAY_KEY_OUTAGE_GRACE_S": str(KEY_GRACE_S),
                     "DETOPS_GATEWAY_REQUESTS_PER_S": "1000", "DETOPS_GATEWAY_DEPENDENCY_CHECK_S": "0.3",
                     "DETOPS_GATEWAY_DEPENDENCY_TIMEOUT_S": "0.3", "DETOPS_GATEWAY_BREAKER_FAILURES": "3",
                     "DETOPS_GATEWAY_BREAKER_RESET_S": "2",
                     "DETOPS_GATEWAY_TENANTS": "{small: {images_per_day: 3, max_job_images: 2}, flood: {requests_per_s: 5}}",
                     "DETOPS_JOBS_DB_CONNECT_TIMEOUT_S": "1", "DETOPS_SERVE_WORKERS": "1",
                     "DETOPS_SERVE_THREADS": "1", "DETOPS_TEST_INFERENCE_FAULT_FILE": str(fault)}
        try:
            with detector_service(trained_model_dir, tmp, overrides=overrides,
                                  service="tests.failing_service:Detector") as server:
                s = Stack(server.url, {**os.environ, **overrides, "PYTHONPATH": str(ROOT)}, tmp, db, broker,
                          server.log)
                s.fault = fault  # type: ignore[attr-defined]
                yield s
        finally:
            db.cut()
            broker.cut()


def error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["error"] == code and body["detail"], body
    return body


def jpeg() -> bytes:
    return synthetic_jpegs(1)[0]


def test_public_routes_need_no_key_and_the_docs_are_detops_own(stack: Stack) -> None:
    for route in ("/livez", "/metrics", "/", "/docs.json", "/v2/health/live", "/v2/health/ready"):
        assert stack.call("GET", route).status_code == 200, route
    ready = stack.call("GET", "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["dependencies"]) == {"job_store", "broker"}
    doc = stack.call("GET", "/docs.json").json()
    assert doc["openapi"] == "3.1.0" and "BentoML Team" not in json.dumps(doc)
    assert doc["info"]["version"].startswith("local:")
    assert "detops keys create" in doc["info"]["description"]
    assert "tenant" not in stack.call("GET", "/metrics").text  # no tenant data in the metrics


def test_401_403_and_both_key_headers(stack: Stack) -> None:
    files = {"image": ("a.jpg", jpeg(), "image/jpeg")}
    response = stack.call("POST", "/detect", files=files)
    error(response, 401, "missing_key")
    assert response.headers["www-authenticate"] == "Bearer"
    error(stack.call("POST", "/detect", "dtk_000000000000_" + "x" * 43, files=files), 401, "invalid_key")
    error(stack.call("POST", "/detect", "not-even-a-key", files=files), 401, "invalid_key")
    error(stack.call("GET", "/schema.json"), 401, "missing_key")  # BentoML's own extra route is closed too
    detect_only = stack.key("acme", "detect")
    assert stack.call("POST", "/detect", detect_only, files=files).status_code == 200
    assert stack.call("POST", "/detect", detect_only, header="x-api-key", files=files).status_code == 200
    error(stack.call("POST", "/jobs", detect_only, files={"images": ("a.jpg", jpeg(), "image/jpeg")}), 403,
          "insufficient_scope")
    error(stack.call("GET", "/jobs/abc", detect_only), 403, "insufficient_scope")
    reader = stack.key("acme", "jobs:read")
    error(stack.call("POST", "/render", reader, files=files), 403, "insufficient_scope")
    error(stack.call("DELETE", "/jobs/abc", reader), 403, "insufficient_scope")
    error(stack.call("GET", "/schema.json", reader), 403, "insufficient_scope")
    assert stack.cli("keys", "create", "--tenant", "acme", "--scopes", "detect,root", check=False).returncode != 0
    # The Open Inference Protocol (serving/inference_protocol.py): metadata, ready and infer need `detect`.
    model = stack.call("POST", "/detect", detect_only, files=files).json()["model"]
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(jpeg()).decode()]}]}
    named = f"/v2/models/{model['name']}"
    for method, route, body in (("GET", "/v2", None), ("GET", named, None), ("GET", f"{named}/ready", None),
                                ("GET", f"{named}/versions/{model['version']}", None),
                                ("POST", f"{named}/infer", infer),
                                ("POST", f"{named}/versions/{model['version']}/infer", infer)):
        error(stack.call(method, route, json=body), 401, "missing_key")
        error(stack.call(method, route, reader, json=body), 403, "insufficient_scope")
        assert stack.call(method, route, detect_only, json=body).status_code == 200, route


def test_tenant_isolation_on_every_route_with_stored_data(stack: Stack) -> None:
    a, b = stack.key("tenant-a", "detect,jobs:write,jobs:read"), stack.key("tenant-b", "detect,jobs:write,jobs:read")
    images = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(synthetic_jpegs(2))]
    submitted = stack.call("POST", "/jobs", a, files=images, headers={"Idempotency-Key": "same-key"})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["job_id"]
    missing = "0" * 32
    for method, route in (("GET", f"/jobs/{job}"), ("GET", f"/jobs/{job}/results"),
                          ("GET", f"/jobs/{job}/results?format=coco"), ("DELETE", f"/jobs/{job}")):
        theirs = error(stack.call(method, route, b), 404, "job_not_found")
        nobody = error(stack.call(method, route.replace(job, missing), b), 404, "job_not_found")
        assert theirs["detail"].replace(job, "X") == nobody["detail"].replace(missing, "X")  # nothing to probe
    # The same Idempotency-Key is B's own: a new job, not A's replayed.
    other = stack.call("POST", "/jobs", b, files=images, headers={"Idempotency-Key": "same-key"})
    assert other.status_code == 202 and other.json()["job_id"] != job and "idempotent-replayed" not in other.headers
    assert stack.call("GET", f"/jobs/{job}", a).json()["job_id"] == job
    assert stack.call("GET", f"/jobs/{job}/results", a).status_code == 200
    # The result cache is per tenant: B's first request of an image A sent is a miss.
    image = {"image": ("x.jpg", synthetic_jpegs(3)[2], "image/jpeg")}
    assert stack.call("POST", "/detect", a, files=image).headers["x-cache"] == "miss"
    assert stack.call("POST", "/detect", a, files=image).headers["x-cache"] == "hit"
    assert stack.call("POST", "/detect", b, files=image).headers["x-cache"] == "miss"
    assert stack.call("DELETE", f"/jobs/{job}", a).status_code == 200


def test_purge_deletes_what_a_tenant_left_behind(stack: Stack) -> None:
    from monitoring.store import open_store

    doomed, kept = stack.key("doomed", "detect,jobs:write,jobs:read"), stack.key("kept", "detect,jobs:write,jobs:read")
    jobs = {}
    for key in (doomed, kept):
        assert stack.call("POST", "/detect", key, files={"image": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200
        r = stack.call("POST", "/jobs", key, files={"images": ("a.jpg", jpeg(), "image/jpeg")})
        jobs[key] = r.json()["job_id"]
    store = open_store(stack.workdir / "predictions")
    wait_until(lambda: store.tenant_count("doomed") and store.tenant_count("kept"), timeout_s=30,
               what="prediction records of both tenants")
    out = stack.cli("purge", "--tenant", "doomed", "--store", str(stack.workdir / "predictions")).stdout
    assert "purged 1 jobs" in out, out
    assert store.tenant_count("doomed") == 0 and store.tenant_count("kept") >= 1
    assert not (stack.workdir / "objects" / jobs[doomed]).exists()
    assert (stack.workdir / "objects" / jobs[kept]).exists()
    error(stack.call("GET", f"/jobs/{jobs[doomed]}", doomed), 404, "job_not_found")
    assert stack.call("GET", f"/jobs/{jobs[kept]}", kept).status_code == 200
    assert stack.cli("purge", "--tenant", "x", "--image", "0" * 64, check=False).returncode != 0


def test_revoked_key_is_refused_by_the_running_service(stack: Stack) -> None:
    key = stack.key("revoked", "jobs:read")
    assert stack.call("GET", "/jobs/" + "0" * 32, key).status_code == 404  # accepted (no such job)
    key_id = key.split("_")[1]
    listed = stack.cli("keys", "list", "--tenant", "revoked").stdout
    assert key_id in listed and "active" in listed and key.split("_", 2)[2] not in listed
    stack.cli("keys", "revoke", key_id)
    wait_until(lambda: stack.call("GET", "/jobs/" + "0" * 32, key).status_code == 401, timeout_s=15,
               what="the revoked key refused (gateway.key_cache_ttl_s = 1)")
    assert "revoked" in stack.cli("keys", "list", "--tenant", "revoked").stdout


def test_429_rates_and_quotas(stack: Stack) -> None:
    flood = stack.key("flood", "jobs:read")
    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: stack.call("GET", "/jobs/" + "0" * 32, flood), range(40)))
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert int(limited[0].headers["retry-after"]) >= 1 and limited[0].json()["error"] == "rate_limited"
    assert {r.status_code for r in codes} <= {404, 429}
    small = stack.key("small", "detect,jobs:write")
    three = [("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(synthetic_jpegs(3))]
    error(stack.call("POST", "/jobs", small, files=three), 413, "too_many_images")  # tenant's job size: 2
    assert stack.call("POST", "/jobs", small, files=three[:2]).status_code == 202
    assert stack.call("POST", "/detect", small, files={"image": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200
    over = stack.call("POST", "/detect", small, files={"image": ("a.jpg", jpeg(), "image/jpeg")})
    error(over, 429, "quota_exceeded")  # 3 images per day
    assert int(over.headers["retry-after"]) >= 1


def test_job_store_down_jobs_answer_503_fast_and_detect_keeps_working(stack: Stack) -> None:
    """While the job store (also the key database) is down, /jobs answers 503 at once and /detect keeps
    working for a cached key, until the key's TTL plus gateway.key_outage_grace_s has passed."""
    key = stack.key("degraded", "detect,jobs:write,jobs:read")
    image = {"image": ("a.jpg", jpeg(), "image/jpeg")}
    assert stack.call("POST", "/detect", key, files=image).status_code == 200  # the key is cached now
    cached_at = time.monotonic()
    stack.db.cut()
    try:
        wait_until(lambda: not stack.call("GET", "/readyz").json()["dependencies"]["job_store"]["up"],
                   timeout_s=15, what="/readyz showing the job store down")
        ready = stack.call("GET", "/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True  # still routed for /detect
        started = time.monotonic()
        down = stack.call("POST", "/jobs", key, files={"images": ("a.jpg", jpeg(), "image/jpeg")})
        took = time.monotonic() - started
        error(down, 503, "job_store_unavailable")
        assert int(down.headers["retry-after"]) >= 1
        print(f"POST /jobs with the job store down answered 503 in {took:.3f} s")
        error(stack.call("GET", "/jobs/" + "0" * 32, key), 503, "job_store_unavailable")
        detect = stack.call("POST", "/detect", key, files=image)
        if time.monotonic() - cached_at < KEY_TTL_S + KEY_GRACE_S:  # a very slow machine got past the grace
            assert detect.status_code == 200, detect.text
        wait_until(lambda: stack.call("POST", "/detect", key, files=image).status_code == 503, timeout_s=30,
                   interval_s=1, what="the cached key refused once its TTL plus the outage grace had passed")
        error(stack.call("POST", "/detect", key, files=image), 503, "auth_unavailable")
    finally:
        stack.db.restore()
    wait_until(lambda: stack.call("GET", "/readyz").json()["dependencies"]["job_store"]["up"], timeout_s=15,
               what="/readyz showing the job store up again")
    assert stack.call("POST", "/jobs", key, files={"images": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 202


def fail_open_count(stack: Stack) -> float:
    match = re.search(r"^detops_rate_limits_fail_open_total (\S+)$", stack.call("GET", "/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def test_broker_down_refuses_new_jobs_and_serves_the_rest(stack: Stack) -> None:
    """Redis down (the broker and the rate limits' storage): new jobs 503, the rest served with the
    limits failing open, which /readyz names and /metrics counts."""
    key = stack.key("brokerless", "detect,jobs:write,jobs:read")
    job = stack.call("POST", "/jobs", key, files={"images": ("a.jpg", jpeg(), "image/jpeg")}).json()["job_id"]
    assert stack.call("GET", "/readyz").json()["rate_limits"]["enforced"] is True
    failed_open = fail_open_count(stack)
    stack.broker.cut()
    try:
        wait_until(lambda: not stack.call("GET", "/readyz").json()["dependencies"]["broker"]["up"],
                   timeout_s=15, what="/readyz showing the broker down")
        assert stack.call("GET", "/readyz").status_code == 200
        error(stack.call("POST", "/jobs", key, files={"images": ("a.jpg", jpeg(), "image/jpeg")}), 503,
              "broker_unavailable")
        assert stack.call("GET", f"/jobs/{job}", key).status_code == 200
        assert stack.call("POST", "/detect", key, files={"image": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200
        ready = stack.call("GET", "/readyz")
        assert ready.status_code == 200 and ready.json()["rate_limits"]["enforced"] is False, ready.text
        assert fail_open_count(stack) > failed_open  # every unenforced check counted
    finally:
        stack.broker.restore()
    wait_until(lambda: stack.call("GET", "/readyz").json()["dependencies"]["broker"]["up"], timeout_s=15,
               what="/readyz showing the broker up again")
    wait_until(lambda: stack.call("GET", f"/jobs/{job}", key).status_code == 200
               and stack.call("GET", "/readyz").json()["rate_limits"]["enforced"], timeout_s=15,
               what="/readyz showing the rate limits enforced again once a limit was counted")


def test_circuit_breaker_opens_on_failing_inference_and_closes_by_itself(stack: Stack) -> None:
    key = stack.key("breaker", "detect")
    fresh = iter(synthetic_jpegs(12))  # distinct images: cache hits would not reach the model
    fault: Path = stack.fault  # type: ignore[attr-defined]
    fault.touch()
    try:
        codes = [stack.call("POST", "/detect", key, files={"image": ("a.jpg", next(fresh), "image/jpeg")}).status_code
                 for _ in range(3)]
        assert codes == [500, 500, 500]
        error(stack.call("POST", "/detect", key, files={"image": ("a.jpg", next(fresh), "image/jpeg")}), 503,
              "circuit_open")
        ready = stack.call("GET", "/readyz")
        assert ready.status_code == 503 and ready.json()["circuit"] == "open"
    finally:
        fault.unlink()
    wait_until(lambda: stack.call("POST", "/detect", key, files={"image": ("a.jpg", next(fresh), "image/jpeg")}
                                  ).status_code == 200, timeout_s=20, interval_s=1, what="the circuit closing")
    assert stack.call("GET", "/readyz").json()["circuit"] == "closed"


def test_too_many_concurrent_uploads_are_refused_at_once(stack: Stack) -> None:
    """Uploads that never finish their body hold their slot for gateway.body_timeout_s at most."""
    import socket

    key = stack.key("slow", "detect")
    host, port = stack.url.split("//")[1].split(":")
    socks = []
    try:
        for _ in range(40):  # more than gateway.max_concurrent_uploads (32): bodies announced, never sent
            s = socket.create_connection((host, int(port)))
            s.sendall(f"POST /detect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b".encode())
            socks.append(s)
        time.sleep(1)
        error(stack.call("POST", "/detect", key, files={"image": ("a.jpg", jpeg(), "image/jpeg")}), 503, "overloaded")
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: stack.call("POST", "/detect", key, files={"image": ("a.jpg", jpeg(), "image/jpeg")}
                                  ).status_code == 200, timeout_s=30, what="upload slots freed")


def test_schemathesis_over_every_operation(stack: Stack) -> None:
    key = stack.key("fuzz", "detect,jobs:write,jobs:read")
    report = stack.workdir / "schemathesis.xml"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", f"{stack.url}/docs.json", "-H", f"Authorization: Bearer {key}",
         "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
         "--max-examples", "50", "--phases", "examples,coverage,fuzzing", "--mode", "positive", "--seed", "1",
         "--generation-database", "none", "--max-time", "110", "--report", "junit", "--report-junit-path", str(report)],
        cwd=ROOT, env={**stack.env, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks"},
        capture_output=True, text=True, timeout=400, check=False)
    out = done.stdout + done.stderr
    print(out[-4000:])
    assert done.returncode == 0, out[-6000:]
    tested = re.search(r"Tested:\s+(\d+)", out)
    assert tested and int(tested.group(1)) == 10, out[-3000:]  # every operation, none refused as invalid
    # At least 50 requests per operation that takes input, counted independently in the service's access log.
    per_route: dict[tuple[str, str], int] = {}
    for line in stack.log.read_text(errors="replace").splitlines():
        if line.startswith('{"ts"') and '"tenant": "fuzz"' in line:
            record = json.loads(line)
            route = re.sub(r"^/jobs/[^/]+", "/jobs/{id}", record["path"])
            per_route[(record["method"], route)] = per_route.get((record["method"], route), 0) + 1
    print(per_route)
    for op in (("POST", "/detect"), ("POST", "/detect_batch"), ("POST", "/render"), ("POST", "/jobs"),
               ("GET", "/jobs/{id}"), ("GET", "/jobs/{id}/results"), ("DELETE", "/jobs/{id}")):
        assert per_route.get(op, 0) >= 50, (op, per_route)


def test_no_key_or_image_bytes_in_any_log_line(stack: Stack) -> None:
    """Runs last (file order): every key this module made and every image it sent went through the service."""
    text = stack.log.read_text(errors="replace")
    assert stack.keys
    for key in stack.keys:
        assert key not in text and key.split("_", 2)[2] not in text
    for marker in ("JFIF", "\x89PNG", "/9j/"):  # JPEG/PNG headers, raw or base64
        assert marker not in text, marker
    access = [json.loads(line) for line in text.splitlines() if line.startswith('{"ts"')]
    assert access and all({"request_id", "tenant", "key_id", "path", "status"} <= set(r) for r in access)
    assert {"tenant-a", "tenant-b"} <= {r["tenant"] for r in access}
