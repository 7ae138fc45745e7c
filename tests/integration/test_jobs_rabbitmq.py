"""The jobs over RabbitMQ with the default SQLite job store: a RabbitMQ node of the test's own (never
the machine's shared one) killed with SIGKILL while `detops worker` is mid-job and other jobs wait
in its queue, then restarted. Jobs are submitted through the real /jobs app in process (FastAPI's
test client on serving/jobs/api.py: the same code the service mounts). The reaper's re-publication
is pushed out of reach (jobs.requeue_after_s: 10 min), so every job that completes here was carried
by the broker's own durable queue. The check is the fault table's `check_jobs`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serving.jobs import api as jobs_api
from serving.jobs.store import JobStore
from tests.fixtures import images
from tests.jobs_services import (check_jobs, job_env, rabbitmq_node, register_model_dir, start_worker, wait_until,
                                 webhook_receiver)

pytestmark = pytest.mark.integration

MODEL_NAME = "detops-jobs-rabbitmq-test"


@pytest.fixture(scope="module")
def rabbit(trained_model_dir: Path, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from pipelines.registry import set_champion

    tmp = tmp_path_factory.mktemp("jobs-rabbitmq")
    set_champion(MODEL_NAME, register_model_dir(trained_model_dir, MODEL_NAME), reason="tests")
    with rabbitmq_node(tmp / "rabbitmq") as broker, webhook_receiver() as receiver:
        env = job_env({**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "DETOPS_CACHE_DIR": str(tmp / "cache"),
                       "DETOPS_SERVE_MODEL_NAME": MODEL_NAME, "DETOPS_JOBS_CHUNK_SIZE": "4",
                       "DETOPS_JOBS_REQUEUE_AFTER_S": "600", "DETOPS_JOBS_REAP_INTERVAL_S": "0.5",
                       "DETOPS_JOBS_WEBHOOK_SCHEMES": "[http]", "DETOPS_JOBS_WEBHOOK_ALLOW_PRIVATE": "true"},
                      broker_url=broker.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                      object_store_url=str(tmp / "objects"), webhook_secret="rabbitmq-test-secret")
        yield {"env": env, "broker": broker, "tmp": tmp, "db": JobStore(env["DETOPS_DATABASE_URL"]),
               "receiver": receiver}


@pytest.fixture()
def client(rabbit: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The /jobs app of this process, configured by the module's environment."""
    for key, value in rabbit["env"].items():
        if key.startswith("DETOPS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(jobs_api, "_backend", None)  # built again from this environment
    with TestClient(jobs_api.app) as test_client:
        yield test_client


def submit(client: TestClient, n: int, callback_url: str, picture: bytes | None = None) -> str:
    files = [("images", (f"{i}.jpg", picture or images.jpeg(80, 60, seed=i))) for i in range(n)]
    response = client.post("/jobs", files=files, data={"callback_url": callback_url})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_rabbitmq_killed_mid_job_with_jobs_queued(rabbit: dict, client: TestClient) -> None:
    db: JobStore = rabbit["db"]
    hook = rabbit["receiver"].url
    worker = start_worker(rabbit["env"], rabbit["tmp"] / "worker.log")
    try:
        running = submit(client, 40, hook, images.smooth_jpeg(1600, 1200))
        queued = [submit(client, 6, hook) for _ in range(2)]  # their wake-ups wait behind it in RabbitMQ's queue
        wait_until(lambda: db.counts(running).processed >= 4, timeout_s=120, what="the first job running")
        assert db.counts(running).processed < 40, "the job finished before the kill"
        rabbit["broker"].kill()
        rabbit["broker"].start()
        row = check_jobs(db, "RabbitMQ kill -9 mid-job, 2 queued", [running, *queued], receiver=rabbit["receiver"])
    finally:
        worker.stop()
    assert row.succeeded == 52
