"""The deployment's pure parts: the smoke comparison (its thresholds each ± ε), agreement, the gates,
MLflow webhook signatures, the state file, and the generated nginx configuration (checked by the real
`nginx -t` when installed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import deploy.verify
from deploy.state import ColourProcess, DeployState, Stack
from deploy.verify import _agree, _same_detections, gates, model_requests, traffic
from deploy.watch import signature_ok
from pipelines.config.deploy import DeployConfig
from pipelines.types import Box
from tests.mutants.deploy import smoke_ignores_confidence, smoke_iou_loose

BOX = Box(10, 10, 50, 60)
# The production thresholds (params.yaml deploy.smoke_iou, smoke_conf_tolerance) and the ε of the ± ε
# cases: far above float noise (the served runtime repeats evaluation's numbers to ~1e-7).
SMOKE_IOU, SMOKE_CONF = DeployConfig().smoke_iou, DeployConfig().smoke_conf_tolerance
EPS_IOU, EPS_CONF = 0.002, 2e-5


def box_at_iou(box: Box, iou: float) -> Box:
    """`box` moved right so that its IoU with `box` is `iou` (width w moved by d: IoU = (w - d) / (w + d))."""
    d = (box.x2 - box.x1) * (1 - iou) / (1 + iou)
    return Box(box.x1 + d, box.y1, box.x2 + d, box.y2)


def threshold_problems() -> list[str]:
    """Served detections that differ from the recorded ones by each smoke threshold ± ε, judged by the
    product's comparison (looked up at call time, so a mutant replaces it): just inside must pass, just
    outside must be refused. What did not happen as it must; empty when the thresholds hold."""
    recorded = [(0, BOX, 0.80), (1, Box(70, 70, 90, 95), 0.41)]
    cases = {  # label: (served detection from a recorded one, whether it must pass)
        "IoU just inside": (lambda c, b, p: (c, box_at_iou(b, SMOKE_IOU + EPS_IOU), p), True),
        "IoU just outside": (lambda c, b, p: (c, box_at_iou(b, SMOKE_IOU - EPS_IOU), p), False),
        "confidence just inside": (lambda c, b, p: (c, b, p + SMOKE_CONF - EPS_CONF), True),
        "confidence just outside": (lambda c, b, p: (c, b, p - SMOKE_CONF - EPS_CONF), False),
        "both just inside": (lambda c, b, p: (c, box_at_iou(b, SMOKE_IOU + EPS_IOU), p - SMOKE_CONF + EPS_CONF),
                             True),
    }
    problems = []
    for label, (perturb, must_pass) in cases.items():
        served = [perturb(*d) for d in recorded]
        found = deploy.verify._same_detections(recorded, served, iou=SMOKE_IOU, conf_tolerance=SMOKE_CONF)
        if (found == "") != must_pass:
            problems.append(f"{label}: {'refused (' + found + ')' if found else 'passed'}")
    return problems


def test_smoke_thresholds_hold_to_within_epsilon() -> None:
    assert threshold_problems() == []


@pytest.mark.parametrize("mutant", [smoke_iou_loose, smoke_ignores_confidence])
def test_a_smoke_comparison_reading_thresholds_loosely_fails_the_epsilon_check(mutant) -> None:  # noqa: ANN001
    with mutant():
        problems = threshold_problems()
    assert problems, f"{mutant.__name__}: the ± ε check still passes"
    assert all("just outside: passed" in p for p in problems), problems


def test_smoke_comparison_tolerates_float_noise_and_names_a_real_difference() -> None:
    expected = [(0, BOX, 0.80), (1, Box(70, 70, 90, 95), 0.41)]
    noisy = [(1, Box(70.01, 70, 90, 95), 0.41003), (0, BOX, 0.79995)]  # other order, tiny differences
    assert _same_detections(expected, noisy, iou=0.99, conf_tolerance=1e-4) == ""
    assert "1 detections served, 2 recorded" in _same_detections(expected, noisy[:1], iou=0.99, conf_tolerance=1e-4)
    moved = [(0, Box(14, 10, 54, 60), 0.80), (1, Box(70, 70, 90, 95), 0.41)]
    assert "box IoU" in _same_detections(expected, moved, iou=0.99, conf_tolerance=1e-4)
    shifted = [(0, BOX, 0.79), (1, Box(70, 70, 90, 95), 0.41)]
    assert "confidence" in _same_detections(expected, shifted, iou=0.99, conf_tolerance=1e-4)
    relabelled = [(2, BOX, 0.80), (1, Box(70, 70, 90, 95), 0.41)]
    assert "class-0" in _same_detections(expected, relabelled, iou=0.99, conf_tolerance=1e-4)


def test_agreement_matches_class_and_iou_one_to_one() -> None:
    old = [[10, 10, 50, 60, 0, 0.9], [70, 70, 90, 95, 1, 0.5]]
    agree, shifts = _agree(old, [[12, 11, 50, 61, 0, 0.85], [70, 70, 91, 95, 1, 0.55]])
    assert agree and shifts == pytest.approx([-0.05, 0.05])
    assert not _agree(old, [[12, 11, 50, 61, 1, 0.85], [70, 70, 91, 95, 1, 0.55]])[0]  # a class changed
    assert not _agree(old, old[:1])[0]  # one detection lost
    assert _agree([], []) == (True, [])


def _window(idle_requests: int, errors: int = 0, agreeing: int | None = None) -> dict:
    idle = {"requests": idle_requests, "errors": errors, "error_rate": errors / max(idle_requests, 1), "p95_ms": 12.0}
    live = {"requests": 100, "errors": 0, "error_rate": 0.0, "p95_ms": 10.0}
    images = idle_requests - errors
    agree = agreeing if agreeing is not None else images
    return {"idle": idle, "live": live, "agreement": {"images": images, "agreeing": agree,
                                                      "agreement": agree / images if images else None}}


def test_gates_judge_the_window_only_with_enough_traffic() -> None:
    cfg = DeployConfig()
    smoke = {"images": 8, "mismatches": []}
    assert [c.passed for c in gates({"smoke": smoke}, cfg)] == [True]
    failing_smoke = gates({"smoke": {"images": 8, "mismatches": ["img.jpg: 1 detections served, 2 recorded"]}}, cfg)
    assert not failing_smoke[0].passed and "img.jpg" in failing_smoke[0].note
    quiet = gates({"smoke": smoke, "shadow": _window(3)}, cfg)
    assert all(c.passed for c in quiet) and "not judged" in quiet[-1].note
    checks = {c.name: c for c in gates({"smoke": smoke, "shadow": _window(50, errors=2, agreeing=40)}, cfg)}
    assert not checks["error_rate"].passed and not checks["agreement"].passed and checks["p95_ratio"].passed


def test_traffic_counts_model_requests_per_colour() -> None:
    def entry(traffic: str, uri: str, upstream: str, status: str, seconds: str) -> dict:
        return {"traffic": traffic, "uri": uri, "upstream": upstream, "upstream_status": status, "upstream_s": seconds}

    entries = [entry("live", "/detect", "127.0.0.1:3101", "200", "0.010"),
               entry("live", "/readyz", "127.0.0.1:3101", "200", "0.001"),
               entry("shadow", "/detect?conf=0.5", "127.0.0.1:3102", "502", "0.050"),
               entry("shadow", "/detect", "", "", ""),
               # The Open Inference Protocol: infer runs the model (with or without a version), its
               # metadata, ready and health routes do not.
               entry("live", "/v2/models/m/infer", "127.0.0.1:3101", "200", "0.020"),
               entry("shadow", "/v2/models/m/versions/7/infer", "127.0.0.1:3102", "200", "0.030"),
               *(entry(kind, uri, f"127.0.0.1:{port}", "200", "0.001")
                 for kind, port in (("live", 3101), ("shadow", 3102))
                 for uri in ("/v2/models/m", "/v2/models/m/ready", "/v2/models/m/versions/7/ready",
                             "/v2/health/ready", "/v2", "/v2/models/infer/ready"))]
    assert traffic(entries, 3101, ("live",))["requests"] == 2  # probes do not count
    shadow = traffic(entries, 3102, ("shadow",))
    assert shadow["requests"] == 2 and shadow["errors"] == 1 and shadow["p95_ms"] == pytest.approx(49.0)
    assert model_requests(entries, "shadow") == 3 and model_requests(entries, "live") == 2


def _signed(secret: str, body: bytes, timestamp: int, delivery: str = "d-1") -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"{delivery}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"X-MLflow-Signature": "v1," + base64.b64encode(digest).decode(), "X-MLflow-Timestamp": str(timestamp),
            "X-MLflow-Delivery-Id": delivery}


def test_mlflow_webhook_signatures_are_verified() -> None:
    body, now = b'{"entity": "model_version_alias"}', int(time.time())
    assert signature_ok("s" * 20, _signed("s" * 20, body, now), body)
    assert not signature_ok("s" * 20, _signed("t" * 20, body, now), body)  # another secret
    assert not signature_ok("s" * 20, _signed("s" * 20, body, now), body + b" ")  # another body
    assert not signature_ok("s" * 20, _signed("s" * 20, body, now - 3600), body)  # a replay
    assert not signature_ok("s" * 20, {}, body)


def test_state_round_trips_and_keeps_history(tmp_path: Path) -> None:
    state = DeployState(tmp_path)
    stack = Stack(live="green", live_since="2026-11-30T10:00:00+00:00", previous_version="3", nginx_pid=42,
                  colours={"green": ColourProcess("4", "m:abc", 3102, 43, "t", workers=[(44, 1.5)])})
    state.save(stack)
    assert state.stack() == stack and state.stack().live_version == "4"
    rollout = state.start_rollout("4", "3", "green", "webhook")
    state.finish_rollout(rollout, "passed", figures={"switch_s": 0.01})
    assert [(r.version, r.verdict, r.figures) for r in state.rollouts()] == [("4", "passed", {"switch_s": 0.01})]
    with state.lock():
        assert state.rollout(rollout.id).trigger == "webhook"


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="no nginx")
def test_the_generated_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    from deploy import nginx

    text = nginx.render(host="127.0.0.1", port=8080, blue_port=3101, green_port=3102, prefix=tmp_path,
                        canary_percent=10, max_body_bytes=10 ** 6, timeout_s=60)
    assert nginx.write_config(text, tmp_path) is True and nginx.write_config(text, tmp_path) is False
    checked = subprocess.run([nginx.executable(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    with pytest.raises(Exception, match="nginx -t refused"):
        nginx.write_config(text.replace("keepalive 32;", "keepalive thirty-two;"), tmp_path)
    nginx.set_routing(tmp_path, live="green", shadow=True)
    assert {p.name for p in (tmp_path / "route").iterdir()} == {"green", "shadow"}
    nginx.set_routing(tmp_path, live="blue", canary=True)
    assert {p.name for p in (tmp_path / "route").iterdir()} == {"canary"}


def test_the_watchers_control_socket_answers_one_watcher_per_deployment(tmp_path: Path) -> None:
    from deploy.rollout import Deployer
    from deploy.watch import Watcher, ask_watcher, control_path
    from pipelines.config.serving import ServeConfig
    from pipelines.errors import DetopsError

    cfg = DeployConfig(state_dir=str(tmp_path / "state"))
    assert ask_watcher(cfg, {"command": "ping"}) is None  # no watcher: the command works alone
    said: list[str] = []
    watcher = Watcher(Deployer(cfg, ServeConfig()), say=said.append)
    watcher.start_control()
    try:
        assert control_path(cfg).stat().st_mode & 0o777 == 0o600
        assert ask_watcher(cfg, {"command": "ping"}) == {"ok": True}
        with pytest.raises(DetopsError, match="another watcher already follows"):
            Watcher(Deployer(cfg, ServeConfig())).start_control()
        assert ask_watcher(cfg, {"command": "ping"}) == {"ok": True}  # the refused one left it alone
        refused = ask_watcher(cfg, {"command": "rollback", "reason": "test"})
        assert refused == {"ok": False, "error": "deploy rollback: no previous version recorded "
                                                 "(nothing was rolled out yet)"}
        assert ask_watcher(cfg, {"command": "reboot"})["error"].startswith("unknown command 'reboot'")
    finally:
        watcher.stop_control()
    assert not control_path(cfg).exists() and ask_watcher(cfg, {"command": "ping"}) is None
