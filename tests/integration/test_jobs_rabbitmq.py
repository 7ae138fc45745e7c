"""The jobs over RabbitMQ with the default SQLite job store: a RabbitMQ node of the test's own (never
the machine's shared one) restarted while jobs wait in its queue, and `detops worker` consuming
them afterwards. Jobs are submitted through the real /jobs app in process (FastAPI's test client
on serving/jobs/api.py: the same code the service mounts). The reaper's re-publication is pushed
out of reach (jobs.requeue_after_s: 10 min), so every job that completes here was delivered by the
broker's own durable queue."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serving.jobs import api as jobs_api
from serving.jobs.store import JobStore
from tests.fixtures import images
from tests.jobs_services import (duplicated_results, job_env, rabbitmq_node, register_model_dir, start_worker,
                                 wait_until)

pytestmark = pytest.mark.integration

MODEL_NAME = "detops-jobs-rabbitmq-test"


@pytest.fixture(scope="module")
def rabbit(trained_model_dir: Path, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from pipelines.registry import set_champion

    tmp = tmp_path_factory.mktemp("jobs-rabbitmq")
    set_champion(MODEL_NAME, register_model_dir(trained_model_dir, MODEL_NAME), reason="tests")
    with rabbitmq_node(tmp / "rabbitmq") as broker:
        env = job_env({**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "DETOPS_CACHE_DIR": str(tmp / "cache"),
                       "DETOPS_SERVE_MODEL_NAME": MODEL_NAME, "DETOPS_JOBS_CHUNK_SIZE": "4",
                       "DETOPS_JOBS_REQUEUE_AFTER_S": "600", "DETOPS_JOBS_REAP_INTERVAL_S": "0.5"},
                      broker_url=broker.url, database_url=f"sqlite:///{tmp / 'jobs.db'}",
                      object_store_url=str(tmp / "objects"))
        yield {"env": env, "broker": broker, "tmp": tmp, "db": JobStore(env["DETOPS_DATABASE_URL"])}


@pytest.fixture()
def client(rabbit: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The /jobs app of this process, configured by the module's environment."""
    for key, value in rabbit["env"].items():
        if key.startswith("DETOPS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(jobs_api, "_backend", None)  # built again from this environment
    with TestClient(jobs_api.app) as test_client:
        yield test_client


def submit(client: TestClient, n: int) -> str:
    response = client.post("/jobs", files=[("images", (f"{i}.jpg", images.jpeg(80, 60, seed=i))) for i in range(n)])
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_rabbitmq_restart_with_jobs_queued(rabbit: dict, client: TestClient) -> None:
    db: JobStore = rabbit["db"]
    worker = start_worker(rabbit["env"], rabbit["tmp"] / "worker1.log")
    try:
        first = submit(client, 5)
        wait_until(lambda: (j := db.get_job(first)) and j.status == "succeeded", timeout_s=120, what="the first job")
    finally:
        worker.stop()
    queued = [submit(client, 6) for _ in range(3)]  # no consumer: they wait in RabbitMQ's queue
    assert {db.get_job(j).status for j in queued} == {"queued"}
    rabbit["broker"].stop()  # SIGTERM: RabbitMQ's graceful stop
    rabbit["broker"].start()
    worker = start_worker(rabbit["env"], rabbit["tmp"] / "worker2.log")
    try:
        for job_id in queued:
            wait_until(lambda j=job_id: db.get_job(j).status == "succeeded", timeout_s=120,
                       what=f"job {job_id} after the broker restart")
    finally:
        worker.stop()
    assert duplicated_results(db, queued) == 0
    assert [db.counts(j).succeeded for j in queued] == [6, 6, 6]
    print("fault: RabbitMQ node restarted, 3 jobs queued: accepted 3  lost 0  duplicated 0")
