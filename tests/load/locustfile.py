"""Locust traffic for the Detector service: mostly /detect, some /detect_batch and /render.

Images: ultralytics' two sample photos (bus.jpg 810x1080, zidane.jpg 1280x720) plus synthetic images
like the pipeline's (rendered in memory at start-up), or every .jpg/.png of the folder named by
$DETOPS_LOAD_IMAGES. Each response is checked (status, JSON shape, JPEG bytes); at the end the
`quitting` listener compares the run with its SLOs (p95 latency, failure ratio) and sets the exit
code: 1 when one is missed, 0 otherwise (failures within the allowed ratio do not fail the run).

Run through `make loadtest` (tests/load/run.py), or by hand against a running service:
`locust -f tests/load/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:3000`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from functools import cache
from pathlib import Path

from locust import HttpUser, between, events, task

# Locust puts its own script folder on sys.path, not the repository: the project's test helpers
# (tests.load.run, tests.serving_process) are imported from there.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serving.client import auth_headers  # noqa: E402
from tests.load.run import IMAGES_ENV, evaluate_slo, load_config  # noqa: E402

CFG = load_config()
JPEG_MAGIC = b"\xff\xd8\xff"
DETECTION_KEYS = {"box", "class_id", "class_name", "confidence", "raw_confidence"}
BOX_KEYS = {"x1", "y1", "x2", "y2"}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--slo-p95-ms", type=float, default=CFG.max_p95_ms, include_in_web_ui=False,
                        help="SLO: 95th percentile latency of all requests, ms")
    parser.add_argument("--slo-failure-ratio", type=float, default=CFG.max_failure_ratio, include_in_web_ui=False,
                        help="SLO: largest share of failed requests")
    parser.add_argument("--batch-images", type=int, default=CFG.batch_images, include_in_web_ui=False,
                        help="images per /detect_batch request")
    parser.add_argument("--synthetic-images", type=int, default=CFG.synthetic_images, include_in_web_ui=False,
                        help="synthetic images rendered at start-up (without $DETOPS_LOAD_IMAGES)")


@cache
def traffic_images(synthetic: int) -> tuple[tuple[str, bytes], ...]:
    """(file name, bytes) of every image the users send, shuffled once with a fixed seed."""
    folder = os.environ.get(IMAGES_ENV)
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise SystemExit(f"{IMAGES_ENV}={folder}: no .jpg/.png images there")
        images = [(p.name, p.read_bytes()) for p in files]
    else:
        from ultralytics.utils import ASSETS

        from tests.serving_process import synthetic_jpegs

        images = [(f"synthetic_{i:03d}.jpg", data) for i, data in enumerate(synthetic_jpegs(synthetic))]
        images += [(name, (ASSETS / name).read_bytes()) for name in ("bus.jpg", "zidane.jpg")]
    random.Random(0).shuffle(images)
    return tuple(images)


def detect_body_problem(body: object) -> str | None:
    """Why a /detect body does not have the documented shape, or None when it does."""
    if not isinstance(body, dict) or not isinstance(body.get("detections"), list):
        return "no detections list"
    if not {"width", "height", "sha256"} <= set(body.get("image") or {}):
        return "no image size/sha256"
    for det in body["detections"]:
        if not isinstance(det, dict) or not DETECTION_KEYS <= set(det) or not BOX_KEYS <= set(det["box"]):
            return f"malformed detection {det!r:.200}"
        if not 0 <= det["confidence"] <= 1:
            return f"confidence out of [0, 1]: {det['confidence']}"
    return None


class DetectorUser(HttpUser):
    """A client that uploads images with short think times; each user walks the image list from its
    own offset so concurrent users send different images."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.images = traffic_images(opts.synthetic_images)
        self.batch_size = opts.batch_images
        start = random.randrange(len(self.images))
        self.next_image = itertools.cycle(self.images[start:] + self.images[:start]).__next__
        self.client.headers.update(auth_headers())  # DETOPS_API_KEY

    @task(8)
    def detect(self) -> None:
        name, data = self.next_image()
        with self.client.post("/detect", files={"image": (name, data, "image/jpeg")}, name="/detect",
                              catch_response=True) as resp:
            self._check_json(resp, single=True)

    @task(1)
    def detect_batch(self) -> None:
        files = [("images", (name, data, "image/jpeg"))
                 for name, data in (self.next_image() for _ in range(self.batch_size))]
        with self.client.post("/detect_batch", files=files, name="/detect_batch", catch_response=True) as resp:
            self._check_json(resp, single=False)

    @task(1)
    def render(self) -> None:
        name, data = self.next_image()
        with self.client.post("/render", files={"image": (name, data, "image/jpeg")}, name="/render",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif not resp.headers.get("content-type", "").startswith("image/jpeg"):
                resp.failure(f"content-type {resp.headers.get('content-type')!r}, expected image/jpeg")
            elif not resp.content.startswith(JPEG_MAGIC):
                resp.failure("body is not a JPEG")
            else:
                resp.success()

    def _check_json(self, resp, *, single: bool) -> None:
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return
        try:
            body = resp.json()
        except ValueError:
            resp.failure("body is not JSON")
            return
        bodies = [body] if single else body
        if not single and (not isinstance(body, list) or len(body) != self.batch_size):
            resp.failure(f"expected a list of {self.batch_size} results")
            return
        problem = next(filter(None, map(detect_body_problem, bodies)), None)
        if problem:
            resp.failure(problem)
        else:
            resp.success()


def summary_row(name: str, entry) -> dict[str, float | int | str]:
    """One endpoint's (or the total's) numbers for the run's summary file."""
    pct = entry.get_response_time_percentile
    return {"name": name, "requests": entry.num_requests, "failures": entry.num_failures,
            "rps": entry.total_rps, "p50_ms": pct(0.5) or 0.0, "p95_ms": pct(0.95) or 0.0,
            "p99_ms": pct(0.99) or 0.0, "max_ms": entry.max_response_time or 0.0}


@events.quitting.add_listener
def _check_slo(environment, **_kwargs) -> None:
    """Compare the run's totals with the SLOs; exit code 1 and the reasons when one is missed. With
    --csv, also write `<prefix>_summary.json` (per endpoint and total, and the verdict) for run.py."""
    stats, opts = environment.stats, environment.parsed_options
    total = stats.total
    verdict = evaluate_slo(requests=total.num_requests, failures=total.num_failures,
                           p95_ms=total.get_response_time_percentile(0.95) or 0.0,
                           max_p95_ms=opts.slo_p95_ms, max_failure_ratio=opts.slo_failure_ratio)
    if verdict.ok:
        print(f"SLO met: p95 {verdict.p95_ms:.0f} ms <= {opts.slo_p95_ms:.0f} ms, failure ratio "
              f"{verdict.failure_ratio:.2%} <= {opts.slo_failure_ratio:.2%} over {verdict.requests} requests")
    else:
        print("SLO missed: " + "; ".join(verdict.missed))
    environment.process_exit_code = 0 if verdict.ok else 1
    if opts.csv_prefix:
        rows = [summary_row(f"{e.method} {e.name}", e) for e in sorted(stats.entries.values(), key=lambda e: e.name)]
        summary = {"users": opts.num_users, "run_time_s": opts.run_time, "endpoints": rows,
                   "total": summary_row("all", total),
                   "slo": {"max_p95_ms": opts.slo_p95_ms, "max_failure_ratio": opts.slo_failure_ratio,
                           "p95_ms": verdict.p95_ms, "failure_ratio": verdict.failure_ratio,
                           "met": verdict.ok, "missed": verdict.missed},
                   "errors": [{"error": f"{e.method} {e.name}: {e.error}", "occurrences": e.occurrences}
                              for e in stats.errors.values()]}
        Path(f"{opts.csv_prefix}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
