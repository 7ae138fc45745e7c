"""The load-test harness for real, small and bounded: `python -m tests.load.run` on the session's tiny
model (detops build, bentoml serve, 10 s of Locust with 4 users, service stopped by PID).

The traffic folder holds two good images and one corrupt `.jpg`, so a known share of requests fails
with a 4xx whatever the machine's speed: the failure-ratio SLO is missed for certain, which checks the
`quitting` listener, the exit code and the reports without asserting anything about latency."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.load.run import evaluate_slo
from tests.serving_process import ROOT, synthetic_jpegs

pytestmark = pytest.mark.integration


def test_loadtest_writes_reports_and_fails_on_a_missed_slo(trained_model_dir: Path, tmp_path: Path) -> None:
    from ultralytics.utils import ASSETS

    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(ASSETS / "bus.jpg", images / "bus.jpg")
    (images / "synthetic.jpg").write_bytes(synthetic_jpegs(1)[0])
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = tmp_path / "load"
    run = subprocess.run([sys.executable, "-m", "tests.load.run", "--model-dir", str(trained_model_dir),
                          "--users", "4", "--spawn-rate", "4", "--run-time", "10s", "--out", str(out),
                          "--images", str(images)], cwd=ROOT, capture_output=True, text=True, timeout=400,
                         check=False)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    for report in ("locust_stats.csv", "locust_failures.csv", "locust.html", "locust_summary.json", "serve.log"):
        assert (out / report).is_file() and (out / report).stat().st_size > 0, report
    summary = json.loads((out / "locust_summary.json").read_text())
    names = {row["name"] for row in summary["endpoints"]}
    assert names == {"POST /detect", "POST /detect_batch", "POST /render"}
    total = summary["total"]
    assert total["requests"] > 0 and 0 < total["failures"] < total["requests"]
    assert any("HTTP 4" in err["error"] for err in summary["errors"]), summary["errors"]
    slo = summary["slo"]
    assert not slo["met"] and any(m.startswith("failure ratio") for m in slo["missed"])
    again = evaluate_slo(requests=total["requests"], failures=total["failures"], p95_ms=total["p95_ms"],
                         max_p95_ms=slo["max_p95_ms"], max_failure_ratio=slo["max_failure_ratio"])
    assert again.missed == slo["missed"]
    assert "SLO missed" in run.stdout and "failure ratio" in run.stdout
    # Authentication was on and Locust carried its key: every request ran as tenant loadtest, none got 401.
    access = [json.loads(line) for line in (out / "serve.log").read_text().splitlines() if line.startswith('{"ts"')]
    assert access and all(r["tenant"] == "loadtest" and r["status"] != 401 for r in access), access[:3]


def test_slo_evaluation() -> None:
    met = evaluate_slo(requests=100, failures=1, p95_ms=900, max_p95_ms=1000, max_failure_ratio=0.01)
    assert met.ok and met.failure_ratio == 0.01
    slow = evaluate_slo(requests=100, failures=0, p95_ms=1200, max_p95_ms=1000, max_failure_ratio=0.01)
    assert slow.missed == ["p95 latency 1200 ms > 1000 ms"]
    failing = evaluate_slo(requests=100, failures=2, p95_ms=10, max_p95_ms=1000, max_failure_ratio=0.01)
    assert len(failing.missed) == 1 and failing.missed[0].startswith("failure ratio 2.00%")
    assert not evaluate_slo(requests=0, failures=0, p95_ms=0, max_p95_ms=1000, max_failure_ratio=0.01).ok
