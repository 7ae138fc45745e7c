"""`make bench`: the serving stack against its engine and against a naive server, in one run.

Same model, same imgsz, same images (synthetic, like the pipeline's, cycled so no two consecutive
requests share one) and one client for both servers:

(a) raw engine: images/s of the shared runtime in a tight in-process loop, preprocess + infer +
    postprocess and infer alone, at each batch size (the best one is the engine's ceiling);
(b) served: the BentoML Detector (`bentoml serve`, result cache off so every request runs the model)
    at each concurrency level: images/s and client-side p50/p95 latency of POST /detect;
(c) naive: tests/bench/naive_server.py (FastAPI, one uvicorn worker, ultralytics predict per
    request) at the same levels.

Then, for both servers, a paced run at half of that server's best throughput: requests sent at a
steady rate, p95 compared with the single-request latency (p50 at concurrency 1).

Targets (printed as pass/miss): served >= 0.85 x raw, served >= 3 x naive, p95 at half load <=
2 x single-request latency. They do not set the exit code (this is a measurement on whatever machine
runs it, often shared and noisy) unless `--strict`. Writes reports/bench/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipelines.errors import DetopsError
from serving.client import auth_headers

TARGET_SERVED_OVER_RAW = 0.85
TARGET_SERVED_OVER_NAIVE = 3.0
TARGET_HALF_LOAD_P95_OVER_SINGLE = 2.0


# --------------------------------------------------------------------------- (a) raw engine
def bench_raw(model_dir: Path, images: list[np.ndarray], batch_sizes: list[int], min_seconds: float) -> dict:
    """images/s of the runtime at each batch size, end to end (preprocess + infer + postprocess) and
    infer alone; each measured for at least `min_seconds` after one warm-up call."""
    from serving.runtime import ModelRuntime
    from serving.settings import load_serve_config, ort_threads

    # The same ONNX Runtime threads as one service worker gets.
    runtime = ModelRuntime.load(model_dir, threads=ort_threads(load_serve_config()))
    results = {}
    for size in batch_sizes:
        batches = [[images[(start + i) % len(images)] for i in range(size)] for start in range(0, len(images), size)]
        tensor = runtime.to_input(runtime.letterbox(batches[0])[0])
        results[size] = {
            "full_images_per_s": size * _rate(lambda k, b=batches: runtime.predict(b[k % len(b)]), min_seconds),
            "infer_images_per_s": size * _rate(lambda _k, t=tensor: runtime.infer(t), min_seconds),
        }
    return results


def _rate(step, min_seconds: float) -> float:
    """Calls per second of `step(k)` over at least `min_seconds` (and 3 calls), after one warm-up."""
    step(0)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        step(calls)
        calls += 1
    return calls / (time.perf_counter() - start)


# --------------------------------------------------------------------------- (b, c) HTTP client
async def _post(client, url: str, data: bytes, index: int) -> tuple[float, bool]:
    import httpx

    start = time.perf_counter()
    try:
        resp = await client.post(url, files={"image": (f"bench_{index}.jpg", data, "image/jpeg")})
        ok = resp.status_code == 200 and isinstance(resp.json().get("detections"), list)
    except httpx.HTTPError:
        ok = False
    return time.perf_counter() - start, ok


def _latency_stats(latencies: list[float], ok: int, failed: int, wall: float) -> dict:
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"requests": ok + failed, "failed": failed, "images_per_s": ok / wall if wall else 0.0,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "wall_s": wall}


async def closed_loop(url: str, images: list[bytes], concurrency: int, n_requests: int, max_seconds: float) -> dict:
    """`concurrency` clients each sending its next request as soon as the last one answered, until
    `n_requests` were sent or `max_seconds` passed; latency of successful requests only."""
    import httpx

    latencies: list[float] = []
    counts = {"ok": 0, "failed": 0}
    next_index = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=auth_headers()) as client:
        for i in range(concurrency):  # warm-up: one request per connection, not measured
            await _post(client, url, images[i % len(images)], i)
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            for index in next_index:
                if time.perf_counter() > deadline:
                    return
                seconds, ok = await _post(client, url, images[index % len(images)], index)
                counts["ok" if ok else "failed"] += 1
                if ok:
                    latencies.append(seconds)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _latency_stats(latencies, counts["ok"], counts["failed"], wall)


async def paced(url: str, images: list[bytes], rate: float, n_requests: int) -> dict:
    """`n_requests` sent at a steady `rate` per second whatever the answers (open loop)."""
    import httpx

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None),
                                 headers=auth_headers()) as client:
        await _post(client, url, images[0], 0)
        start = time.perf_counter()

        async def one(index: int) -> tuple[float, bool]:
            await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
            return await _post(client, url, images[index % len(images)], index)

        results = await asyncio.gather(*(one(i) for i in range(n_requests)))
        wall = time.perf_counter() - start
    latencies = [s for s, ok in results if ok]
    stats = _latency_stats(latencies, len(latencies), n_requests - len(latencies), wall)
    return {**stats, "rate_per_s": rate}


def bench_server(url: str, images: list[bytes], levels: list[int], n_requests: int, max_seconds: float) -> dict:
    """Closed-loop runs at each concurrency level, then the paced run at half the best throughput."""
    results = {"levels": {}}
    for level in levels:
        results["levels"][level] = asyncio.run(closed_loop(url, images, level, n_requests, max_seconds))
        row = results["levels"][level]
        print(f"  concurrency {level:>3}: {row['images_per_s']:7.1f} images/s, p50 {row['p50_ms']:.0f} ms, "
              f"p95 {row['p95_ms']:.0f} ms, {row['failed']} failed", flush=True)
    best = max(results["levels"].values(), key=lambda r: r["images_per_s"])
    if not best["images_per_s"]:
        raise DetopsError(f"{url}: no request succeeded at any concurrency level")
    results["images_per_s"] = best["images_per_s"]
    rate = best["images_per_s"] / 2
    # At most about `max_seconds` of paced traffic.
    count = max(10, min(n_requests, int(rate * max_seconds)))
    results["half_load"] = asyncio.run(paced(url, images, rate, count))
    half = results["half_load"]
    print(f"  paced at {rate:.1f}/s: p50 {half['p50_ms']:.0f} ms, p95 {half['p95_ms']:.0f} ms, "
          f"{half['failed']} failed", flush=True)
    return results


@contextmanager
def naive_server(model_dir: Path, imgsz: int, workdir: Path):
    """tests/bench/naive_server.py on a free loopback port, stopped by PID afterwards."""
    from pipelines.processes import HOST, free_port, running

    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.naive_server", "--weights", str(model_dir / "best.pt"),
            "--imgsz", str(imgsz), "--port", str(port)]
    with running(argv, url=f"http://{HOST}:{port}", ready_path="/healthz", env=os.environ,
                 cwd=Path(__file__).resolve().parents[2], log=workdir / "naive.log") as server:
        yield server


# --------------------------------------------------------------------------- report
def summarize(raw: dict, served: dict, naive: dict, model: dict) -> dict:
    """The JSON report: every measurement, the headline ratios and the target verdicts."""
    best_batch = max(raw, key=lambda b: raw[b]["full_images_per_s"])
    raw_best = raw[best_batch]["full_images_per_s"]
    single = served["levels"][min(served["levels"])]["p50_ms"]
    half_ratio = served["half_load"]["p95_ms"] / single
    report = {
        "machine": {"cores": len(os.sched_getaffinity(0)), "cpu": _cpu_name(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "model": model,
        "raw": {"batches": raw, "best_batch": best_batch},
        "served": served,
        "naive": naive,
        "raw_images_per_s": raw_best,
        "served_images_per_s": served["images_per_s"],
        "naive_images_per_s": naive["images_per_s"],
        "served_over_raw": served["images_per_s"] / raw_best,
        "served_over_naive": served["images_per_s"] / naive["images_per_s"] if naive["images_per_s"] else None,
        "served_half_load_p95_over_single": half_ratio,
    }
    report["targets"] = {
        "served_over_raw": {"target": TARGET_SERVED_OVER_RAW, "value": report["served_over_raw"],
                            "pass": report["served_over_raw"] >= TARGET_SERVED_OVER_RAW},
        "served_over_naive": {"target": TARGET_SERVED_OVER_NAIVE, "value": report["served_over_naive"],
                              "pass": (report["served_over_naive"] or 0) >= TARGET_SERVED_OVER_NAIVE},
        "half_load_p95_over_single": {"target": TARGET_HALF_LOAD_P95_OVER_SINGLE, "value": half_ratio,
                                      "pass": half_ratio <= TARGET_HALF_LOAD_P95_OVER_SINGLE},
    }
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_report(report: dict) -> None:
    """Rich tables: the engine per batch size, both servers per concurrency level, the targets."""
    from rich.console import Console
    from rich.table import Table

    # Piped output (make bench | tee) would be cut at 80 columns: the server table needs more.
    console = Console() if sys.stdout.isatty() else Console(width=130)
    m, machine = report["model"], report["machine"]
    console.print(f"model {m['name']} imgsz {m['imgsz']} ({m['model_dir']}); {machine['cores']} cores, "
                  f"{machine['cpu']}")
    engine = Table(title="(a) raw engine (in-process, images/s)")
    for col in ("batch", "preprocess+infer+postprocess", "infer only"):
        engine.add_column(col, justify="right")
    for size, row in report["raw"]["batches"].items():
        mark = " *" if size == report["raw"]["best_batch"] else ""
        engine.add_row(f"{size}{mark}", f"{row['full_images_per_s']:.1f}", f"{row['infer_images_per_s']:.1f}")
    console.print(engine)
    servers = Table(title="(b) served /detect vs (c) naive server (client-side)")
    for col in ("load", "served img/s", "served p50 ms", "served p95 ms", "served failed",
                "naive img/s", "naive p50 ms", "naive p95 ms", "naive failed"):
        servers.add_column(col, justify="right")

    def cells(row: dict) -> list[str]:
        return [f"{row['images_per_s']:.1f}", f"{row['p50_ms']:.0f}", f"{row['p95_ms']:.0f}", str(row["failed"])]

    served, naive = report["served"], report["naive"]
    for level in served["levels"]:
        servers.add_row(f"concurrency {level}", *cells(served["levels"][level]), *cells(naive["levels"][level]))
    servers.add_row("paced, half of best", *cells(served["half_load"]), *cells(naive["half_load"]))
    console.print(servers)
    targets = Table(title="targets")
    for col in ("ratio", "value", "target", "verdict"):
        targets.add_column(col, justify="right")
    labels = {"served_over_raw": ("served / raw", ">="), "served_over_naive": ("served / naive", ">="),
              "half_load_p95_over_single": ("p95 at half load / single-request p50", "<=")}
    for key, t in report["targets"].items():
        label, op = labels[key]
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        targets.add_row(label, value, f"{op} {t['target']:g}", "[green]pass[/]" if t["pass"] else "[red]miss[/]")
    console.print(targets)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run (a), (b), (c), print the tables, write the JSON; exit 1 on a missed target only with --strict."""
    from pipelines import environment

    environment.configure()
    parser = argparse.ArgumentParser(prog="python -m tests.bench.serving_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"),
                        help="model folder with model.onnx, model_card.json, best.pt (default: models)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per concurrency level")
    parser.add_argument("--images", type=int, default=64, help="distinct synthetic images")
    parser.add_argument("--engine-seconds", type=float, default=2.0, help="time per engine batch size")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/serving.json"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except DetopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    missed = [k for k, t in report["targets"].items() if not t["pass"]]
    return 1 if args.strict and missed else 0


def run(args: argparse.Namespace) -> dict:
    """The three measurements on the model in `args.model_dir`."""
    import cv2

    from serving.runtime import ModelCard
    from tests.serving_process import BENCH_OVERRIDES, auth_overrides, detector_service, mint_key, service_env
    from tests.serving_process import synthetic_jpegs

    model_dir = args.model_dir
    missing = [f for f in ("model.onnx", "model_card.json", "best.pt") if not (model_dir / f).is_file()]
    if missing:
        raise DetopsError(f"{model_dir}: no {', '.join(missing)}; run `make pipeline` first, or pass --model-dir DIR")
    card = ModelCard.load(model_dir / "model_card.json")
    jpegs = synthetic_jpegs(args.images)
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b in jpegs]
    model = {"name": card.name, "imgsz": card.imgsz, "classes": len(card.classes), "model_dir": str(model_dir),
             "onnx_bytes": (model_dir / "model.onnx").stat().st_size,
             "image_side_px": [min(min(i.shape[:2]) for i in decoded), max(max(i.shape[:2]) for i in decoded)]}
    print(f"(a) raw engine, batch sizes {args.batch_sizes}", flush=True)
    raw = bench_raw(model_dir, decoded, args.batch_sizes, args.engine_seconds)
    with tempfile.TemporaryDirectory(prefix="detops-bench-") as tmp:
        workdir = Path(tmp)
        print("(b) served /detect (bentoml serve, cache off)", flush=True)
        # Authentication on, as in production, with the per-key rates out of the way (capacity is measured).
        overrides = {"DETOPS_SERVE_CACHE_ENTRIES": "0", **auth_overrides(workdir), **BENCH_OVERRIDES}
        os.environ["DETOPS_API_KEY"] = mint_key(service_env(workdir, overrides), tenant="bench", scopes="detect")
        with detector_service(model_dir, workdir, overrides=overrides) as server:
            served = bench_server(server.url + "/detect", jpegs, args.concurrency, args.requests, args.max_seconds)
        print("(c) naive server (FastAPI + ultralytics predict per request)", flush=True)
        with naive_server(model_dir, card.imgsz, workdir) as server:
            naive = bench_server(server.url + "/detect", jpegs, args.concurrency, args.requests, args.max_seconds)
    return summarize(raw, served, naive, model)


if __name__ == "__main__":
    sys.exit(main())
