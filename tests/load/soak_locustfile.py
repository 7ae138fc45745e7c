"""Locust traffic of `make soak` (tests/load/soak.py): two tenants, each with its own key
(DETOPS_SOAK_KEYS="keyA,keyB"; users alternate between them), a steady moderate mix of /detect and
jobs (submit a small job, poll it until it finishes, read its results). Every response is checked;
a job that fails or never finishes within 120 s counts as a failure."""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

from locust import HttpUser, between, task

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serving.client import auth_headers  # noqa: E402
from tests.load.locustfile import detect_body_problem, traffic_images  # noqa: E402

KEYS = [k for k in os.environ.get("DETOPS_SOAK_KEYS", "").split(",") if k]
_user_ids = itertools.count()


class TenantUser(HttpUser):
    wait_time = between(0.2, 0.6)

    def on_start(self) -> None:
        n = next(_user_ids)
        self.client.headers.update(auth_headers(KEYS[n % len(KEYS)] if KEYS else None))
        self.images = traffic_images(24)
        self.next_image = itertools.cycle(self.images[n % len(self.images):] + self.images[:n % len(self.images)]).__next__

    @task(6)
    def detect(self) -> None:
        name, data = self.next_image()
        with self.client.post("/detect", files={"image": (name, data, "image/jpeg")}, name="/detect",
                              catch_response=True) as resp:
            problem = f"HTTP {resp.status_code}" if resp.status_code != 200 else detect_body_problem(resp.json())
            if problem:
                resp.failure(problem)

    @task(1)
    def job(self) -> None:
        files = [("images", self.next_image()) for _ in range(3)]
        with self.client.post("/jobs", files=[(f, (n, d, "image/jpeg")) for f, (n, d) in files], name="/jobs",
                              catch_response=True) as resp:
            if resp.status_code != 202:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            job_id = resp.json()["job_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with self.client.get(f"/jobs/{job_id}", name="/jobs/{id}", catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    return
                status = resp.json()["status"]
            if status in ("succeeded", "partial", "failed", "cancelled"):
                break
            time.sleep(0.5)
        else:
            self.environment.events.request.fire(request_type="JOB", name="job finished", response_time=120000,
                                                 response_length=0, exception=TimeoutError(job_id), context={})
            return
        with self.client.get(f"/jobs/{job_id}/results", name="/jobs/{id}/results", catch_response=True) as resp:
            lines = resp.text.strip().splitlines() if resp.status_code == 200 else []
            if status != "succeeded" or len(lines) != 3:
                resp.failure(f"job {status}, HTTP {resp.status_code}, {len(lines)} result lines")
