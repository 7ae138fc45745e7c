"""Verifying a colour before any client sees it, and reporting it.

- `smoke`: the version's own evaluation sample (images and the calibrated detections its evaluation
  recorded, `evaluation/smoke/` in its training run) sent over HTTP with the same thresholds; each
  image must come back with the same detections: the same number, classes, IoU >= `deploy.smoke_iou`,
  |confidence difference| <= `deploy.smoke_conf_tolerance`. What was evaluated is what is served.
- `traffic`: per colour, the model requests (/detect, /detect_batch, /render, /v2/.../infer) nginx logged
  during a shadow or canary window, their error rate and p95 upstream latency.
- `agreement`: the idle colour's shadow (or canary) answers against the live colour's, joined on image
  hash from the prediction log: the share of images whose detections agree (same classes, IoU >= 0.5),
  and the mean confidence shift of the matched detections.
- `gates`: the verdict on those figures (`deploy.gates`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config.deploy import DeployConfig
from pipelines.errors import DetopsError
from pipelines.types import Box
from serving.client import auth_headers

AGREEMENT_IOU = 0.5
MODEL_ROUTES = ("/detect", "/render")  # requests that run the model (/detect_batch included); probes do not count
# The Open Inference Protocol's inference (serving/inference_protocol.py), with or without a version;
# its metadata and ready routes run no model and do not count.
_V2_INFER = re.compile(r"^/v2/models/[^/?]+(/versions/[^/?]+)?/infer(\?|$)")


@dataclass(frozen=True)
class Check:
    """One gate on the verification: `value <comparison> threshold` gives `passed`."""

    name: str
    passed: bool
    value: float | None
    threshold: float
    comparison: str
    note: str = ""


def smoke(url: str, smoke_dir: Path, *, iou: float, conf_tolerance: float, api_key: str | None = None) -> dict[str, Any]:
    """Send every image of the evaluation sample in `smoke_dir` to `url`/detect with the recorded
    thresholds, with `api_key` (default DETOPS_API_KEY's); returns figures with `mismatches` (one line
    per image that differs, empty when all match)."""
    import httpx

    reference = json.loads((smoke_dir / "smoke.json").read_text())
    thresholds = reference["thresholds"]
    mismatches, boxes = [], 0
    with httpx.Client(timeout=60) as client:
        for image in reference["images"]:
            path = smoke_dir / image["file"]
            response = client.post(f"{url}/detect", files={"image": (path.name, path.read_bytes())},
                                   data={k: str(v) for k, v in thresholds.items()},
                                   headers={"X-Detops-Traffic": "smoke", **auth_headers(api_key)})  # kept out of drift and push
            if response.status_code != 200:
                mismatches.append(f"{path.name}: HTTP {response.status_code} {response.text[:200]}")
                continue
            served = [(d["class_id"], Box(**d["box"]), d["confidence"]) for d in response.json()["detections"]]
            expected = [(d["class_id"], Box(*d["box"]), d["confidence"]) for d in image["detections"]]
            problem = _same_detections(expected, served, iou=iou, conf_tolerance=conf_tolerance)
            if problem:
                mismatches.append(f"{path.name}: {problem}")
            boxes += len(expected)
    return {"images": len(reference["images"]), "detections": boxes, "mismatches": mismatches,
            "iou": iou, "conf_tolerance": conf_tolerance}


def _same_detections(expected: list[tuple[int, Box, float]], served: list[tuple[int, Box, float]], *,
                     iou: float, conf_tolerance: float) -> str:
    """'' when every expected detection has its own served twin (same class, IoU >= iou, confidence
    within the tolerance) and nothing else was served; else what differs."""
    if len(expected) != len(served):
        return f"{len(served)} detections served, {len(expected)} recorded"
    free = list(range(len(served)))
    for cls, box, conf in sorted(expected, key=lambda d: -d[2]):
        twins = [j for j in free if served[j][0] == cls]
        if not twins:
            return f"a class-{cls} detection was recorded and not served"
        best = max(twins, key=lambda j: box.iou(served[j][1]))
        if box.iou(served[best][1]) < iou:
            return f"class-{cls} box IoU {box.iou(served[best][1]):.4f} < {iou}"
        if abs(served[best][2] - conf) > conf_tolerance:
            return f"class-{cls} confidence {served[best][2]:.6f} vs {conf:.6f} recorded"
        free.remove(best)
    return ""


def access_log_offset(log: Path) -> int:
    """Where the next lines of nginx's access log will start (read the window from here)."""
    return log.stat().st_size if log.is_file() else 0


def read_access_log(log: Path, offset: int) -> list[dict[str, Any]]:
    """The JSON lines nginx appended to `log` after `offset`."""
    if not log.is_file():
        return []
    with log.open("rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def recent_access_log(log: Path, max_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """The JSON lines of the last `max_bytes` of nginx's access log (the first, partial line skipped)."""
    if not log.is_file():
        return []
    start = max(log.stat().st_size - max_bytes, 0)
    entries = read_access_log(log, start)
    return entries[1:] if start and entries else entries


def is_model_request(uri: str) -> bool:
    """Whether a request URI (path and query, as nginx logs it) runs the model: /detect, /detect_batch,
    /render, or the Open Inference Protocol's /v2/models/.../infer."""
    return uri.startswith(MODEL_ROUTES) or _V2_INFER.match(uri) is not None


def model_requests(entries: list[dict[str, Any]], kind: str) -> int:
    """How many model requests of `kind` (live, shadow, canary) the access log entries hold."""
    return sum(1 for e in entries if e["traffic"] == kind and is_model_request(e["uri"]))


def traffic(entries: list[dict[str, Any]], port: int, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Model requests of kinds `kinds` (live, shadow, canary) that nginx sent to 127.0.0.1:`port`:
    count, errors (5xx or no answer), error rate and p95 of the upstream time in ms."""
    mine = [e for e in entries if e["traffic"] in kinds and is_model_request(e["uri"])
            and e["upstream"].endswith(f":{port}")]
    errors = sum(1 for e in mine if not e["upstream_status"].isdigit() or int(e["upstream_status"]) >= 500)
    times = [float(e["upstream_s"]) * 1000 for e in mine if _number(e["upstream_s"])]
    return {"requests": len(mine), "errors": errors, "error_rate": errors / len(mine) if mine else 0.0,
            "p95_ms": float(np.percentile(times, 95)) if times else None}


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def agreement(store_location: Path, *, since: datetime, live_version: str, new_version: str, kind: str,
              expected: int, wait_s: float = 15.0) -> dict[str, Any]:
    """Compare the idle colour's `kind` answers (shadow or canary) with the live colour's answers to
    the same images, from the prediction log records written since `since`. Waits up to `wait_s` for
    the `expected` records of the idle colour (the log is written in the background)."""
    from monitoring.store import open_store

    store = open_store(store_location)
    deadline = time.monotonic() + wait_s
    while True:
        new = store.read(since=since, traffic=kind, model_version=new_version)
        if len(new) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    old = store.read(since=since, traffic="live", model_version=live_version)
    old_by_image = old.drop_duplicates("image_sha256").set_index("image_sha256")["detections"]
    agreeing, shifts, compared = 0, [], 0
    for sha, detections in new.drop_duplicates("image_sha256").set_index("image_sha256")["detections"].items():
        if sha not in old_by_image.index:
            continue
        compared += 1
        matched, shift = _agree(json.loads(old_by_image[sha]), json.loads(detections))
        agreeing += matched
        shifts += shift
    return {"images": compared, "logged": len(new), "agreeing": agreeing,
            "agreement": agreeing / compared if compared else None,
            "confidence_shift": float(np.mean(shifts)) if shifts else None}


def _agree(old: list[list[float]], new: list[list[float]]) -> tuple[bool, list[float]]:
    """Whether two logged detection lists ([x1, y1, x2, y2, class, conf]) agree one to one (class and
    IoU >= 0.5), and the confidence shifts (new - old) of the detections that matched."""
    free = list(range(len(new)))
    shifts = []
    for x1, y1, x2, y2, cls, conf in sorted(old, key=lambda d: -d[5]):
        box = Box(x1, y1, x2, y2)
        twins = [j for j in free if int(new[j][4]) == int(cls) and box.iou(Box(*new[j][:4])) >= AGREEMENT_IOU]
        if twins:
            best = max(twins, key=lambda j: box.iou(Box(*new[j][:4])))
            shifts.append(new[best][5] - conf)
            free.remove(best)
    return len(shifts) == len(old) == len(new), shifts


def gates(figures: dict[str, Any], cfg: DeployConfig) -> list[Check]:
    """The verdict on a rollout's figures: the smoke check always; the traffic checks when the shadow
    or canary window saw at least `deploy.gates.min_requests` requests (else noted, not failed)."""
    g = cfg.gates
    mismatches = figures["smoke"]["mismatches"]
    checks = [Check("smoke", not mismatches, len(mismatches), 0, "<=",
                    mismatches[0] if mismatches else f"{figures['smoke']['images']} images as evaluated")]
    window = figures.get("canary") or figures.get("shadow")
    if window is None:
        return checks
    idle, live, agree = window["idle"], window["live"], window["agreement"]
    checks.append(Check("error_rate", idle["error_rate"] <= g.max_error_rate, idle["error_rate"], g.max_error_rate,
                        "<=", f"{idle['errors']} of {idle['requests']} requests"))
    if min(idle["requests"], live["requests"]) < g.min_requests:
        note = f"only {idle['requests']} requests in the window (< {g.min_requests}): latency and agreement not judged"
        return [*checks, Check("traffic", True, idle["requests"], g.min_requests, ">=", note)]
    ratio = idle["p95_ms"] / live["p95_ms"] if idle["p95_ms"] and live["p95_ms"] else None
    checks.append(Check("p95_ratio", ratio is not None and ratio <= g.max_p95_ratio, ratio, g.max_p95_ratio, "<=",
                        f"p95 {idle['p95_ms']:.1f} ms vs {live['p95_ms']:.1f} ms live"))
    share = agree["agreement"]
    checks.append(Check("agreement", share is not None and share >= g.min_agreement, share, g.min_agreement, ">=",
                        f"{agree['agreeing']} of {agree['images']} images agree"))
    return checks


def after_switch_gates(live: dict[str, Any], before: dict[str, Any], cfg: DeployConfig) -> list[Check]:
    """The verdict on the live version after a switch: its requests since then (`live`, from `traffic`)
    against the previous version's just before it (`before`), with the shadow window's gates. The error
    rate is judged from the first request on; p95 once both sides have `deploy.gates.min_requests`."""
    g = cfg.gates
    checks = [Check("after_switch_error_rate", live["error_rate"] <= g.max_error_rate, live["error_rate"],
                    g.max_error_rate, "<=", f"{live['errors']} of {live['requests']} requests since the switch")]
    if min(live["requests"], before["requests"]) < g.min_requests or not (live["p95_ms"] and before["p95_ms"]):
        note = (f"{live['requests']} requests since the switch, {before['requests']} before it "
                f"(< {g.min_requests} on a side): latency not judged yet")
        return [*checks, Check("after_switch_traffic", True, live["requests"], g.min_requests, ">=", note)]
    ratio = live["p95_ms"] / before["p95_ms"]
    return [*checks, Check("after_switch_p95_ratio", ratio <= g.max_p95_ratio, ratio, g.max_p95_ratio, "<=",
                           f"p95 {live['p95_ms']:.1f} ms vs {before['p95_ms']:.1f} ms before the switch")]


def write_report(folder: Path, rollout: Any, checks: list[Check]) -> Path:
    """`rollout-<id>.json` (everything) and `rollout-<id>.md` (readable) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {**asdict(rollout), "checks": [asdict(c) for c in checks],
            "written_at": datetime.now(timezone.utc).isoformat()}
    (folder / f"rollout-{rollout.id}.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    lines = [f"# Rollout {rollout.id}: v{rollout.version} ({rollout.verdict})", "",
             f"- from v{rollout.from_version} to v{rollout.version} on {rollout.colour}, trigger {rollout.trigger}",
             f"- {rollout.started_at} -> {rollout.ended_at}", f"- reason: {rollout.reason or '-'}", "",
             "| check | value | threshold | result | note |", "|---|---|---|---|---|"]
    for c in checks:
        value = "-" if c.value is None else f"{c.value:.4g}"
        lines.append(f"| {c.name} | {value} | {c.comparison} {c.threshold:g} | {'pass' if c.passed else 'FAIL'} | "
                     f"{c.note} |")
    after = rollout.figures.get("after_switch")
    if after:
        lines += ["", "## After the switch", "",
                  f"{after['requests']} requests on v{rollout.version}, {after['errors']} failed; "
                  f"{rollout.reason or 'no gate broke'}."]
    for kind in ("shadow", "canary"):
        window = rollout.figures.get(kind)
        if window:
            lines += ["", f"## {kind.title()} window", "", "| colour | requests | error rate | p95 ms |",
                      "|---|---|---|---|"]
            for colour in ("live", "idle"):
                f = window[colour]
                p95 = "-" if f["p95_ms"] is None else f"{f['p95_ms']:.1f}"
                lines.append(f"| {colour} | {f['requests']} | {f['error_rate']:.3f} | {p95} |")
            a = window["agreement"]
            shift = "-" if a["confidence_shift"] is None else f"{a['confidence_shift']:+.4f}"
            share = "-" if a["agreement"] is None else f"{a['agreement']:.3f}"
            lines += ["", f"Agreement on {a['images']} images: {share}; mean confidence shift {shift}."]
    (folder / f"rollout-{rollout.id}.md").write_text("\n".join(lines) + "\n")
    return folder / f"rollout-{rollout.id}.md"


class VerificationFailed(DetopsError):
    """The idle colour did not pass its verification; the message is the first failed check."""
