"""Durable jobs for real: `bentoml serve` with the /jobs routes, `detops worker` (Celery, prefork),
a Redis server with AOF of the test's own, a PostgreSQL server of its own (both killed with SIGKILL
mid-job in their rows), a local object store, a webhook receiver, and the session's tiny model
registered in the session's MLflow store. Each fault runs jobs made only of good images and ends
with `check_jobs` (tests/jobs_services.py): every job succeeded, every image has exactly one result
row and it succeeded, each job's webhook was taken once after dedupe; images claimed twice
(at-least-once work) are counted. The fault table is printed at the end of the module."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from pipelines.processes import HOST, alive, free_port, spawn, stop, wait_ready
from serving.jobs import store as st
from serving.jobs.store import JobStore
from serving.jobs.webhooks import verify
from tests.fixtures import images
from serving.jobs.store import ENDED
from tests.jobs_services import (Broker, FaultRow, Worker, WebhookReceiver, check_job_status, check_jobs,
                                 check_webhooks, job_env, postgres_server, redis_server, register_model_dir,
                                 start_worker, wait_until, webhook_receiver)
from tests.serving_process import ROOT, import_model, service_env

pytestmark = pytest.mark.integration

MODEL_NAME = "detops-jobs-test"
SECRET = "test-secret-" + uuid.uuid4().hex
MAX_IMAGES, MAX_IMAGE_BYTES, MAX_JOB_BYTES = 400, 3_000_000, 60_000_000
SETTINGS = {  # small chunks, short leases and intervals, so that every fault resolves in seconds
    "DETOPS_JOBS_CHUNK_SIZE": "4", "DETOPS_JOBS_PARALLEL_CHUNKS": "2", "DETOPS_JOBS_CHUNK_TIME_LIMIT_S": "1",
    "DETOPS_JOBS_LEASE_SLACK_S": "1.5", "DETOPS_JOBS_REAP_INTERVAL_S": "0.5", "DETOPS_JOBS_REQUEUE_AFTER_S": "4",
    "DETOPS_JOBS_MODEL_CHECK_INTERVAL_S": "0.5", "DETOPS_JOBS_MAX_ATTEMPTS": "3", "DETOPS_JOBS_RETRY_BACKOFF_S": "1",
    "DETOPS_JOBS_RETRY_BACKOFF_MAX_S": "2", "DETOPS_JOBS_WEBHOOK_BACKOFF_S": "0.3",
    "DETOPS_JOBS_WEBHOOK_BACKOFF_MAX_S": "1", "DETOPS_JOBS_WEBHOOK_MAX_ATTEMPTS": "5",
    "DETOPS_JOBS_WEBHOOK_SCHEMES": "[http, https]", "DETOPS_JOBS_WEBHOOK_ALLOW_PRIVATE": "true",
    "DETOPS_JOBS_MAX_IMAGES_PER_JOB": str(MAX_IMAGES), "DETOPS_JOBS_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
    "DETOPS_JOBS_MAX_JOB_BYTES": str(MAX_JOB_BYTES), "DETOPS_JOBS_INLINE_RESULTS_MAX": "10",
    "DETOPS_JOBS_DB_CONNECT_TIMEOUT_S": "2", "DETOPS_JOBS_RETRY_AFTER_S": "7",
    "DETOPS_SERVE_WORKERS": "1", "DETOPS_SERVE_MAX_PIXELS": "400000000",
}
FAULTS: list[FaultRow] = []


class Service:
    """`bentoml serve` of the Detector on a fixed port, restartable (kill -9 included)."""

    def __init__(self, model_dir: Path, workdir: Path, env: dict[str, str]) -> None:
        import_model(model_dir, env)
        self.env, self.log = env, workdir / "serve.log"
        self.url = f"http://{HOST}:{free_port()}"
        self.pid: int | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "bentoml", "serve", "serving.service:Detector", "--host", HOST,
                "--port", self.url.rsplit(":", 1)[1]]
        self.pid = spawn(argv, log=self.log, env=self.env, cwd=ROOT).pid
        wait_ready(self.url + "/readyz", pid=self.pid, log=self.log, timeout_s=180)

    def stop(self) -> None:
        if self.pid is not None:
            stop(self.pid)
            self.pid = None

    def kill(self) -> None:
        """kill -9 of the server and its workers (BentoML starts each worker in a session of its own,
        out of reach of a signal to the server's process group)."""
        import psutil

        processes = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        for process in processes:
            process.kill()
        psutil.wait_procs(processes, timeout=30)
        self.pid = None


@dataclass
class Stack:
    service: Service
    env: dict[str, str]
    db: JobStore
    postgres: Broker
    redis: Broker
    receiver: WebhookReceiver
    objects: Path
    workdir: Path
    worker: Worker | None = None

    @property
    def url(self) -> str:
        return self.service.url

    def start_worker(self, mutant: str | None = None) -> None:
        # The workers load the registry's MODEL_NAME@champion; the service imported the same folder.
        self.worker = start_worker({**self.env, "DETOPS_SERVE_MODEL_NAME": MODEL_NAME},
                                   self.workdir / f"worker-{time.monotonic_ns()}.log", concurrency=1,
                                   store_url=self.db.url, mutant=mutant)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is not None:
            stop(self.worker.pid, sig=sig, timeout_s=30)
            self.worker = None


@pytest.fixture(scope="module")
def stack(trained_model_dir: Path, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from pipelines.registry import set_champion

    tmp = tmp_path_factory.mktemp("jobs")
    set_champion(MODEL_NAME, register_model_dir(trained_model_dir, MODEL_NAME), reason="tests")
    with postgres_server() as postgres, redis_server(tmp / "redis") as redis, webhook_receiver() as receiver:
        env = job_env({**service_env(tmp), **SETTINGS, "MLFLOW_TRACKING_URI": mlflow_uri,
                       "DETOPS_CACHE_DIR": str(tmp / "cache")}, database_url=postgres.url, broker_url=redis.url,
                      object_store_url=str(tmp / "objects"), webhook_secret=SECRET)
        db = JobStore(postgres.url)
        db.create_schema()
        (tmp / "objects").mkdir()
        service = Service(trained_model_dir, tmp, env)
        stack = Stack(service=service, env=env, db=db, postgres=postgres, redis=redis, receiver=receiver,
                      objects=tmp / "objects", workdir=tmp)
        try:
            service.start()
            stack.start_worker()
            yield stack
        finally:
            stack.stop_worker()
            service.stop()
            db.close()
    for row in FAULTS:
        print(row.line())


# --------------------------------------------------------------------------- helpers
def submit(stack: Stack, files: list[tuple[str, bytes]], data: dict | None = None, key: str | None = None,
           timeout: float = 120) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(stack.url + "/jobs", files=[("images", f) for f in files], data=data, headers=headers,
                      timeout=timeout)


def accepted(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status_url"] == f"/jobs/{body['job_id']}" and response.headers["location"] == body["status_url"]
    return body["job_id"]


def summary(stack: Stack, job_id: str) -> dict:
    response = httpx.get(f"{stack.url}/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def finished(stack: Stack, job_id: str, timeout_s: float = 120) -> dict:
    return wait_until(lambda: (s := summary(stack, job_id))["status"] in ENDED and s,
                      timeout_s=timeout_s, what=f"job {job_id} to finish")


def processed(stack: Stack, job_id: str) -> int:
    """How many images of the job have a result (of any status: progress, not success)."""
    return stack.db.counts(job_id).processed


def check_in_database(stack: Stack, fault: str, job_ids: list[str]) -> None:
    """`check_jobs` (every image succeeded once, webhooks taken once); record the fault's row."""
    FAULTS.append(check_jobs(stack.db, fault, job_ids, receiver=stack.receiver))


def hooked(stack: Stack) -> dict[str, str]:
    """The form field that gives a job the stack's webhook receiver."""
    return {"callback_url": stack.receiver.url}


def big_job(stack: Stack, n: int) -> str:
    """A job of `n` good 1600x1200 photos-like images (long enough to be caught mid-job), with a webhook."""
    picture = images.smooth_jpeg(1600, 1200)
    return accepted(submit(stack, [(f"p{i}.jpg", picture) for i in range(n)], hooked(stack)))


def leasing_pid(stack: Stack, job_id: str, *, unwritten_result: bool = False) -> int | None:
    """The live process holding the job's newest lease (a killed one's lease lingers until it expires);
    with `unwritten_result`, only a lease on an image that already has a result row without a body."""
    lease = select(st.job_images.c.lease_owner).where(st.job_images.c.job_id == job_id,
                                                      st.job_images.c.lease_owner.is_not(None))
    if unwritten_result:
        lease = lease.join(st.job_results, (st.job_results.c.job_id == st.job_images.c.job_id)
                           & (st.job_results.c.image_index == st.job_images.c.image_index)).where(
            st.job_results.c.body.is_(None))
    with stack.db.engine.connect() as conn:
        owner = conn.execute(lease.order_by(st.job_images.c.lease_expires_at.desc()).limit(1)).scalar()
    pid = int(owner.rsplit(":", 1)[1]) if owner else None
    return pid if pid and alive(pid) else None


def good_images(n: int, side: int = 96) -> list[tuple[str, bytes]]:
    return [(f"img{i:04d}.jpg", images.jpeg(side, side * 3 // 4, seed=i)) for i in range(n)]


# --------------------------------------------------------------------------- the API
def test_submit_poll_results_webhook(stack: Stack) -> None:
    files = good_images(2) + [("broken.jpg", images.truncated_jpeg())]
    job_id = accepted(submit(stack, files, {"conf": "0.001", "callback_url": stack.receiver.url}))
    done = finished(stack, job_id)
    assert done["status"] == "partial" and done["counts"] == {"total": 3, "succeeded": 2, "failed": 1,
                                                              "dead_lettered": 0, "pending": 0}
    assert done["error"].startswith("1 of 3 images") and check_job_status(stack.db, job_id) == "partial"
    assert done["model"] == {"name": MODEL_NAME, "version": "1"}
    error, = done["errors"]
    assert (error["index"], error["name"], error["error"]) == (2, "broken.jpg", "corrupt_image") and error["detail"]
    assert [r["index"] for r in done["results"]] == [0, 1, 2] and done["results"][0]["name"] == "img0000.jpg"
    assert done["results"][0]["model"]["version"] == "1" and done["results"][0]["image"]["width"] == 96
    lines = httpx.get(f"{stack.url}/jobs/{job_id}/results").text.splitlines()
    assert [json.loads(line) for line in lines] == done["results"]
    coco = httpx.get(f"{stack.url}/jobs/{job_id}/results", params={"format": "coco"}).json()
    assert len(coco) == sum(len(r["detections"]) for r in done["results"][:2]) > 0  # conf 0.001: some boxes
    assert {c["image_id"] for c in coco} <= {0, 1}
    assert len(httpx.get(f"{stack.url}/jobs/{job_id}/results", params={"from_index": 2}).text.splitlines()) == 1

    delivery = wait_until(lambda: [d for d in stack.receiver.received if json.loads(d["body"])["job_id"] == job_id],
                          timeout_s=60, what="the webhook")[0]
    assert verify(SECRET, delivery["headers"], delivery["body"])
    assert check_webhooks(stack.receiver, stack.db, [job_id]).startswith("1 of 1")  # says partial, once
    assert not verify("another-secret", delivery["headers"], delivery["body"])
    assert not verify(SECRET, delivery["headers"], delivery["body"] + b" ")
    payload = json.loads(delivery["body"])
    assert payload["status"] == "partial" and payload["counts"]["failed"] == 1
    assert wait_until(lambda: summary(stack, job_id)["webhook"]["state"] == "delivered", timeout_s=30,
                      what="the delivery recorded")

    # JSON with base64 images: the same images give the same results.
    body = {"images": [{"name": n, "data": base64.b64encode(d).decode()} for n, d in files[:2]], "conf": 0.001}
    as_json = finished(stack, accepted(httpx.post(stack.url + "/jobs", json=body, timeout=60)))
    assert [r["detections"] for r in as_json["results"]] == [r["detections"] for r in done["results"][:2]]


def test_idempotent_resubmission(stack: Stack) -> None:
    key = "order-" + uuid.uuid4().hex
    files = good_images(2)
    first = submit(stack, files, {"conf": "0.3"}, key=key)
    again = submit(stack, files, {"conf": "0.3"}, key=key)
    assert accepted(first) == accepted(again) and again.headers["idempotent-replayed"] == "true"
    conflict = submit(stack, files, {"conf": "0.4"}, key=key)
    assert conflict.status_code == 409 and conflict.json()["error"] == "idempotency_key_reused"
    assert accepted(first) in conflict.json()["detail"]
    assert finished(stack, accepted(first))["status"] == "succeeded"


def test_limits_and_bad_requests_are_named_4xx(stack: Stack) -> None:
    too_many = submit(stack, [("x.png", images.one_pixel_png())] * (MAX_IMAGES + 1))
    assert too_many.status_code == 413 and "jobs.max_images_per_job" in too_many.json()["detail"]
    too_big = submit(stack, [("big.jpg", b"\xff\xd8" + os.urandom(MAX_IMAGE_BYTES))])
    assert too_big.status_code == 413 and too_big.json()["error"] == "image_too_large"
    assert "jobs.max_image_bytes" in too_big.json()["detail"]
    whole = submit(stack, [(f"{i}.jpg", os.urandom(MAX_IMAGE_BYTES - 10))
                           for i in range(MAX_JOB_BYTES // MAX_IMAGE_BYTES + 1)])
    assert whole.status_code == 413 and "jobs.max_job_bytes" in whole.json()["detail"], whole.text
    cases = [
        (submit(stack, good_images(1), {"conf": "2"}), 400, "invalid_parameter", "conf"),
        (submit(stack, good_images(1), {"callback_url": "ftp://example.com/x"}), 422, "callback_url_refused", "scheme"),
        (submit(stack, good_images(1), {"colour": "red"}), 400, "invalid_parameter", "colour"),
        (submit(stack, good_images(1), {"classes": "[p\x02"}), 400, "invalid_parameter", "classes"),
        (httpx.post(stack.url + "/jobs", json={"images": [{"name": "a", "data": "***"}]}), 400, "invalid_parameter",
         "base64"),
        (httpx.post(stack.url + "/jobs", json={"images": []}), 400, "missing_field", "at least one image"),
        (httpx.post(stack.url + "/jobs", content=b"x", headers={"content-type": "text/plain"}), 400,
         "invalid_parameter", "multipart"),
        (httpx.get(stack.url + "/jobs/nope"), 404, "job_not_found", "nope"),
    ]
    for response, status, code, words in cases:
        assert response.status_code == status and response.json()["error"] == code, response.text
        assert words in response.json()["detail"]
    with stack.db.engine.connect() as conn:  # nothing refused was stored
        stored = conn.execute(select(func.count()).select_from(st.job_images).where(st.job_images.c.name == "big.jpg"))
        assert stored.scalar() == 0


def test_cancel_deletes_images_and_results(stack: Stack) -> None:
    picture = images.smooth_jpeg(1600, 1200)
    job_id = accepted(submit(stack, [(f"p{i}.jpg", picture) for i in range(120)]))
    wait_until(lambda: processed(stack, job_id) > 0, timeout_s=60, what="the job to start")
    cancelled = httpx.delete(f"{stack.url}/jobs/{job_id}").json()
    assert cancelled["status"] == "cancelled" and cancelled["deleted"]
    assert not (stack.objects / job_id).exists() and stack.db.results(job_id) == []
    time.sleep(2)  # a chunk in flight when it was cancelled writes nothing
    assert stack.db.results(job_id) == [] and summary(stack, job_id)["status"] == "cancelled"
    gone = httpx.get(f"{stack.url}/jobs/{job_id}/results")
    assert gone.status_code == 410 and gone.json()["error"] == "job_deleted"


def test_a_new_live_version_serves_new_jobs_while_running_ones_finish_on_theirs(
        stack: Stack, trained_model_dir: Path) -> None:
    from pipelines.registry import set_champion

    picture = images.smooth_jpeg(1600, 1200)
    running = accepted(submit(stack, [(f"p{i}.jpg", picture) for i in range(300)]))
    wait_until(lambda: processed(stack, running) >= 8, timeout_s=60, what="the first job to run")
    set_champion(MODEL_NAME, register_model_dir(trained_model_dir, MODEL_NAME), reason="tests: rollout")
    time.sleep(1.5)  # past the workers' model check interval
    later = accepted(submit(stack, good_images(2)))
    assert processed(stack, running) < 300, "the first job finished before the rollout"
    assert finished(stack, later)["model"]["version"] == "2"
    assert finished(stack, running)["model"]["version"] == "1"
    assert {r.model_version for r in stack.db.results(running)} == {"1"}
    assert {r.model_version for r in stack.db.results(later)} == {"2"}
    set_champion(MODEL_NAME, "1", reason="tests: back")


# --------------------------------------------------------------------------- faults
def test_worker_killed_at_three_points_of_a_job(stack: Stack) -> None:
    """kill -9 of the pool process working on the job early and midway (Celery requeues its
    message), then of the whole worker late (the reaper republishes), each mid-chunk."""
    total = 240
    job_id = big_job(stack, total)
    points = []
    for share, whole_worker in ((0.02, False), (0.4, False), (0.75, True)):
        wait_until(lambda s=share: processed(stack, job_id) >= s * total, timeout_s=120, what=f"{share:.0%} done")
        pid = wait_until(lambda: leasing_pid(stack, job_id), timeout_s=30, what="a chunk in flight", interval_s=0.01)
        done = processed(stack, job_id)
        assert done < total, "the job finished before the kill"
        points.append(done)
        if whole_worker:
            stack.stop_worker(sig=signal.SIGKILL)
            stack.start_worker()
        else:
            os.kill(pid, signal.SIGKILL)
    assert len(set(points)) == 3
    check_in_database(stack, f"kill -9 worker x3 (at {'/'.join(map(str, points))} of {total})", [job_id])


def test_poison_image_is_dead_lettered_and_the_rest_succeeds(stack: Stack) -> None:
    # 169 MP (under Pillow's own bomb limit): decodes for longer than jobs.chunk_time_limit_s, every time
    poison = images.blank_png(13000)
    job_id = accepted(submit(stack, good_images(3) + [("poison.png", poison)] + good_images(2)))
    done = finished(stack, job_id, timeout_s=150)
    assert done["status"] == "partial" and done["counts"]["succeeded"] == 5 and done["counts"]["dead_lettered"] == 1
    error, = done["errors"]
    assert error["index"] == 3 and error["error"] == "poison_image" and "3 times" in error["detail"]
    assert check_job_status(stack.db, job_id) == "partial"  # a dead letter is no success


def test_broker_killed_mid_job(stack: Stack) -> None:
    running = big_job(stack, 60)
    queued = [accepted(submit(stack, good_images(6), hooked(stack))) for _ in range(2)]  # behind it in Redis
    wait_until(lambda: processed(stack, running) >= 4, timeout_s=60, what="the job running")
    assert processed(stack, running) < 60, "the job finished before the kill"
    stack.redis.kill()
    try:
        during = accepted(submit(stack, good_images(3), hooked(stack)))  # stored; its wake-up is not published
    finally:
        stack.redis.start()
    check_in_database(stack, "Redis (AOF) kill -9 mid-job, 2 queued + 1 submitted while down",
                      [running, *queued, during])


def test_api_restarted_right_after_a_202(stack: Stack) -> None:
    job_id = accepted(submit(stack, good_images(20), hooked(stack)))
    stack.service.kill()
    stack.service.start()
    assert finished(stack, job_id)["status"] == "succeeded"
    check_in_database(stack, "API killed (-9) right after 202, restarted", [job_id])


def test_database_killed_mid_job(stack: Stack) -> None:
    def jobs_in_db() -> int:
        with stack.db.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(st.jobs)).scalar()

    running = big_job(stack, 60)
    wait_until(lambda: processed(stack, running) >= 4, timeout_s=60, what="a job running")
    before, objects_before = jobs_in_db(), set(os.listdir(stack.objects))
    assert processed(stack, running) < 60, "the job finished before the kill"
    stack.postgres.kill()  # kill -9 of the postmaster: the worker's chunks retry with backoff
    try:
        refused = submit(stack, good_images(3), timeout=60)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7", refused.text
        assert refused.json()["error"] == "job_store_unavailable"
        assert httpx.get(f"{stack.url}/jobs/{uuid.uuid4().hex}").status_code == 503
    finally:
        stack.postgres.start()  # crash recovery on the same data folder
    assert jobs_in_db() == before and set(os.listdir(stack.objects)) == objects_before  # nothing half-written
    retried = accepted(submit(stack, good_images(3), hooked(stack)))
    check_in_database(stack, "PostgreSQL kill -9 mid-job (503 at submit while down)", [running, retried])


def test_mutant_worker_marking_images_done_first_fails_the_fault_check(stack: Stack) -> None:
    """tests/mutants/jobs.py `done_before_result` under the first fault of the table (a pool process
    killed mid-chunk): the job still ends succeeded with every image "processed", as the old check
    wanted, but the images of the killed chunk have no result: `check_jobs` must fail."""
    stack.stop_worker()
    stack.start_worker(mutant="done_before_result")
    try:
        job_id = big_job(stack, 24)
        pid = wait_until(lambda: leasing_pid(stack, job_id, unwritten_result=True), timeout_s=60,
                         what="a chunk in flight", interval_s=0.01)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(AssertionError, match="images succeeded"):
            check_jobs(stack.db, "mutant done_before_result, pool process kill -9", [job_id], receiver=stack.receiver)
        assert stack.db.get_job(job_id).status == "succeeded" and processed(stack, job_id) == 24  # the old check
    finally:
        stack.stop_worker()
        stack.start_worker()


def test_webhook_receiver_fails_then_recovers(stack: Stack) -> None:
    stack.receiver.fail_with = 503
    try:
        job_id = accepted(submit(stack, good_images(1), {"callback_url": stack.receiver.url}))
        wait_until(lambda: (summary(stack, job_id)["webhook"] or {}).get("attempts", 0) >= 2, timeout_s=60,
                   what="two failed deliveries")
    finally:
        stack.receiver.fail_with = None
    hook = wait_until(lambda: (w := summary(stack, job_id)["webhook"])["state"] == "delivered" and w, timeout_s=60,
                      what="the delivery after the receiver recovered")
    assert hook["attempts"] >= 3 and hook["last_error"] is None
    mine = [d for d in stack.receiver.received if json.loads(d["body"])["job_id"] == job_id]
    assert [d["status"] for d in mine][:2] == [503, 503] and mine[-1]["status"] == 200
    assert all(verify(SECRET, d["headers"], d["body"]) for d in mine)
    check_in_database(stack, "webhook receiver 503 then recovered", [job_id])

    stack.receiver.fail_with = 500  # never recovers: marked failed after jobs.webhook_max_attempts
    try:
        doomed = accepted(submit(stack, good_images(1), {"callback_url": stack.receiver.url}))
        hook = wait_until(lambda: (w := summary(stack, doomed)["webhook"]) and w["state"] == "failed" and w,
                          timeout_s=90, what="the delivery to be given up")
    finally:
        stack.receiver.fail_with = None
    assert hook["attempts"] == 5 and hook["last_error"] == "HTTP 500"
