"""`make bench`: the serving stack against the machine's engine ceiling and a naive server.

For each (imgsz, precision) in --sizes x --precisions (default 160 and 640, fp32 and int8): the same
trained weights (640: `best.pt` exported again at 640, YOLO being fully convolutional; int8: a static
QDQ copy, evaluation/quantize.py, calibrated on synthetic train-like images), the same 64 synthetic
JPEGs (sizes as params.yaml `synthesize:`):

(a) raw machine: images/s of the shared runtime (letterbox + ONNX Runtime + NMS + calibration) in tight
    loops, the best of ONE process with all cores' threads and ONE single-thread process PER CORE
    running at once (summed), batch 1 and 8; once on decoded arrays (decode excluded) and once decoding
    each JPEG as the service does (decode included). The "raw_machine" figure is the decode-included
    one, since the service decodes too; both are reported.
(b) served: plain `bentoml serve` (tests/serving_process.py via pipelines/processes.py, cache off),
    loaded by `wrk` (a C client, Lua script tests/bench/wrk_detect.lua) with the image as raw body and
    as multipart; the best is `served_images_per_s`; the client's own CPU time is reported as a
    share of the machine. Deferred work is counted: every phase starts with the prediction log's
    featurizer backlog drained (`detops_prediction_log_backlog` on /metrics; the wait is reported), and
    a load's images/s is its answered requests over the load's seconds PLUS the drain after it, so the
    featurizer's CPU is part of the served cost (the answer rate alone is kept as `burst`). A record
    dropped by the prediction log fails the run.
(c) naive: tests/bench/naive_server.py (FastAPI, ultralytics predict per request) at the same imgsz,
    same wrk load (multipart), fp32 weights (it has no int8 path).
(d) latency: single-request p50 (one connection: httpx with multipart, and a lean raw-body client) and
    p95 with requests paced at half of the served throughput (open loop, the lean raw-body client, whose
    own CPU is reported); the ratio is the paced p95 over the raw-body single p50.
(e) cache hit: the service with its cache on, one ~137 KB JPEG sent again and again on one keep-alive
    connection (wrk, raw body and multipart): p50/p95.
(f) Open Inference Protocol: the same service, one image per request through `/v2/models/NAME/infer`
    (binary BYTES tensor, wrk mode v2) vs /detect with the raw body: images/s and single-request p50.

Targets (printed as pass/miss, never asserted; `--strict` exits 1 on a miss): served >= 0.9 x raw
machine at 640 and >= 0.75 x at 160; served >= 3 x naive at 640; p95 at half load <= 2 x single-request
p50; int8's single-request p50 <= fp32's; cache-hit p99 <= 10 ms; the variant gate's int8/fp32
single-request ratio within 15 % of the served one; /v2 infer images/s >= 0.9 x and single p50 <= 1.1 x
/detect's.
The whole bench runs `--runs` times (default 3), each started once the 1-minute load average is at or
below `--max-load` (1.0; waited for up to 5 minutes, a run started above it is left out of the median);
every figure reported is the median of the quiet runs (each run's own rows are in the JSON's `runs`).
Writes reports/bench/serving.json (machine, `rows`, cache hit, targets, `runs`). About 10 minutes per run
on 2 cores; `--runs 1` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from pipelines.errors import DetopsError
from serving.client import auth_headers

WRK_SCRIPT = Path(__file__).with_name("wrk_detect.lua")
TARGET_SERVED_OVER_RAW = {640: 0.9, 160: 0.75}
TARGET_SERVED_OVER_NAIVE = {640: 3.0}
TARGET_HALF_LOAD_P95_OVER_SINGLE = 2.0
TARGET_CACHE_HIT_P99_MS = 10.0
TARGET_GATE_WITHIN = 0.15  # the variant gate's single-request int8/fp32 ratio vs the served one
TARGET_V2_WITHIN = 0.10  # /v2/.../infer (binary) vs /detect: images/s and single-request p50 within 10 %
CACHE_HIT_JPEG_BYTES = 137_000
QUIET_LOAD = 1.0  # a run started above this 1-minute load average is left out of the median
QUIET_WAIT_S = 300.0


# --------------------------------------------------------------------------- (a) raw machine
def engine_rate(model_dir: Path, threads: int, batch: int, seconds: float, jpeg_dir: Path | None,
                images: list[np.ndarray] | None = None) -> float:
    """images/s of `ModelRuntime.predict` on batches of `batch`, `threads` ONNX Runtime threads, for
    `seconds` after a warm-up; with `jpeg_dir`, each image is decoded from its JPEG first (as served)."""
    from serving.imaging import decode_image
    from serving.runtime import ModelRuntime

    runtime = ModelRuntime.load(model_dir, threads=threads)
    jpegs = [p.read_bytes() for p in sorted(jpeg_dir.glob("*.jpg"))] if jpeg_dir else None
    if images is None:
        images = [decode_image(j, max_bytes=1 << 30, max_pixels=1 << 30).rgb for j in jpegs]

    def step(k: int) -> None:
        idx = [(k * batch + i) % len(images) for i in range(batch)]
        if jpegs:
            batch_rgb = [decode_image(jpegs[i], max_bytes=1 << 30, max_pixels=1 << 30).rgb for i in idx]
        else:
            batch_rgb = [images[i] for i in idx]
        runtime.predict(batch_rgb)

    return batch * _rate(step, seconds)


def bench_raw_machine(model_dir: Path, jpeg_dir: Path, cores: int, seconds: float) -> dict:
    """The machine's engine ceiling: best of one process x `cores` threads and `cores` processes x 1
    thread at once, batch 1 and 8, decode excluded and included."""
    results: dict[str, dict[str, float]] = {"decode_excluded": {}, "decode_included": {}}
    for decode in (False, True):
        key = "decode_included" if decode else "decode_excluded"
        for batch in (1, 8):
            results[key][f"1proc_x{cores}threads_b{batch}"] = _engine_processes(model_dir, jpeg_dir, 1, cores,
                                                                                  batch, seconds, decode)
            if cores > 1:
                results[key][f"{cores}proc_x1thread_b{batch}"] = _engine_processes(model_dir, jpeg_dir, cores, 1,
                                                                                     batch, seconds, decode)
    return {**results, **{f"best_{k}": max(v.values()) for k, v in results.items()}}


def _engine_processes(model_dir: Path, jpeg_dir: Path, processes: int, threads: int, batch: int,
                      seconds: float, decode: bool) -> float:
    """Sum of the images/s of `processes` engine processes started together."""
    argv = [sys.executable, "-m", "tests.bench.serving_bench", "--engine-worker", str(model_dir), str(threads),
            str(batch), str(seconds), str(jpeg_dir), "1" if decode else "0"]
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds * 4 + 120)
        if proc.returncode != 0:
            raise DetopsError(f"engine worker exited {proc.returncode}")
        rates.append(float(out.strip().splitlines()[-1]))
    return sum(rates)


def _rate(step, min_seconds: float) -> float:
    """Calls per second of `step(k)` over at least `min_seconds` (and 3 calls), after one warm-up."""
    step(0)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        step(calls)
        calls += 1
    return calls / (time.perf_counter() - start)


# --------------------------------------------------------------------------- wrk
def run_wrk(url: str, files: list[Path], mode: str, connections: int, seconds: float) -> dict:
    """wrk with tests/bench/wrk_detect.lua: its JSON line, images/s, and the client's own CPU seconds
    (from the child's rusage) as a share of the machine over the run."""
    wrk = shutil.which("wrk")
    if not wrk:
        raise DetopsError("wrk is not installed (apt-get install wrk)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "30s", "-s",
                           str(WRK_SCRIPT), url, "--", mode, *map(str, files)],
                          capture_output=True, text=True, timeout=seconds + 120, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise DetopsError(f"wrk failed ({done.returncode}): {done.stderr[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ok = result["requests"] - result["non_2xx"] - result["socket_errors"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cores = len(os.sched_getaffinity(0))
    return {**result, "mode": mode, "connections": connections, "images_per_s": ok / result["duration_s"],
            "client_cpu_s": cpu, "client_cpu_share": cpu / (wall * cores)}


def prediction_log(base_url: str) -> dict[str, float]:
    """The service's prediction log from its /metrics (public): the featurizers' backlog, summed over
    the workers, and the records dropped so far."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    found = {"backlog": 0.0, "dropped": 0.0}
    names = {"detops_prediction_log_backlog": "backlog", "detops_prediction_log_dropped": "dropped"}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text):
        if family.name in names:
            found[names[family.name]] += sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return found


def drain(base_url: str, timeout_s: float = 300.0) -> float:
    """Wait until the featurizers have written everything the requests so far enqueued (backlog 0 twice
    in a row, half a second apart, since a worker refreshes its gauge every flush interval); the seconds
    it took. A record dropped by the prediction log, or a backlog that does not drain, fails the run."""
    started, zero_since = time.perf_counter(), None
    while True:
        state = prediction_log(base_url)
        if state["dropped"]:
            raise DetopsError(f"the prediction log dropped {state['dropped']:.0f} records: the featurizer does not "
                              "keep up with this load, the served figures would count work never done")
        now = time.perf_counter()
        if state["backlog"] == 0:
            if zero_since is not None and now - zero_since >= 0.5:
                return zero_since - started
            zero_since = zero_since or now
        else:
            zero_since = None
        if now - started > timeout_s:
            raise DetopsError(f"the prediction log's backlog ({state['backlog']:.0f}) did not drain in {timeout_s:.0f} s")
        time.sleep(0.1)


def sustained_wrk(base_url: str, path: str, files: list[Path], mode: str, connections: int, seconds: float) -> dict:
    """`run_wrk` from a drained service, counting the drain after it: images/s = answered requests /
    (load seconds + drain seconds); the answer rate alone is `burst_images_per_s`."""
    drained_before = drain(base_url)
    load = run_wrk(base_url + path, files, mode, connections, seconds)
    drain_after = drain(base_url)
    ok = load["images_per_s"] * load["duration_s"]
    return {**load, "burst_images_per_s": load["images_per_s"], "drain_before_s": drained_before,
            "drain_after_s": drain_after, "images_per_s": ok / (load["duration_s"] + drain_after)}


# --------------------------------------------------------------------------- (b, c) HTTP client
async def _post(client, url: str, data: bytes, index: int, mode: str = "multipart") -> tuple[float, bool]:
    """One request: /detect multipart, or (mode `v2`) an Open Inference Protocol binary BYTES tensor."""
    import httpx

    start = time.perf_counter()
    try:
        if mode == "v2":
            header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                             "parameters": {"binary_data_size": len(data) + 4}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            resp = await client.post(url, content=header + len(data).to_bytes(4, "little") + data,
                                     headers={"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"})
            ok = resp.status_code == 200 and "inference-header-content-length" in resp.headers
        else:
            resp = await client.post(url, files={"image": (f"bench_{index}.jpg", data, "image/jpeg")})
            ok = resp.status_code == 200 and isinstance(resp.json().get("detections"), list)
    except httpx.HTTPError:
        ok = False
    return time.perf_counter() - start, ok


def _latency_stats(latencies: list[float], ok: int, failed: int, wall: float) -> dict:
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"requests": ok + failed, "failed": failed, "images_per_s": ok / wall if wall else 0.0,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "wall_s": wall}


async def closed_loop(url: str, images: list[bytes], concurrency: int, n_requests: int, max_seconds: float,
                      mode: str = "multipart") -> dict:
    """`concurrency` clients each sending its next request as soon as the last one answered, until
    `n_requests` were sent or `max_seconds` passed; latency of successful requests only."""
    import httpx

    latencies: list[float] = []
    counts = {"ok": 0, "failed": 0}
    next_index = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=auth_headers()) as client:
        for i in range(concurrency):  # warm-up: one request per connection, not measured
            await _post(client, url, images[i % len(images)], i, mode)
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            for index in next_index:
                if time.perf_counter() > deadline:
                    return
                seconds, ok = await _post(client, url, images[index % len(images)], index, mode)
                counts["ok" if ok else "failed"] += 1
                if ok:
                    latencies.append(seconds)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _latency_stats(latencies, counts["ok"], counts["failed"], wall)


class RawBodyClient:
    """POST /detect with the image as the raw body over plain asyncio streams, HTTP/1.1 keep-alive (a
    connection per request in flight, reused): about a tenth of httpx's CPU per request. The paced load
    needs it: from httpx with multipart the client took a third of a core at 106 requests/s, on the
    same two cores as the service, and its own lag was most of the measured p95."""

    def __init__(self, url: str, images: list[bytes]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        extra = "".join(f"{k}: {v}\r\n" for k, v in auth_headers().items())
        self.requests = [f"POST {parts.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: image/jpeg\r\n{extra}"
                         f"Content-Length: {len(data)}\r\n\r\n".encode() + data for data in images]
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, index: int) -> tuple[float, bool]:
        """One request: its seconds, and whether it was answered 200."""
        start = time.perf_counter()
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.requests[index % len(self.requests)])
            status = (await reader.readline()).split()
            length = None
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length is None:  # a body it cannot delimit (closed early, chunked): never reuse the connection
                raise ValueError("response without Content-Length")
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return time.perf_counter() - start, False
        self.idle.append((reader, writer))
        return time.perf_counter() - start, len(status) > 1 and status[1] == b"200"

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def single_raw(url: str, images: list[bytes], seconds: float) -> dict:
    """One request at a time on one connection for `seconds` (RawBodyClient), after one warm-up."""
    client = RawBodyClient(url, images)
    await client.post(0)
    latencies, failed, start, index = [], 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        took, ok = await client.post(index)
        if ok:
            latencies.append(took)
        failed += not ok
        index += 1
    client.close()
    return _latency_stats(latencies, len(latencies), failed, time.perf_counter() - start)


async def paced(url: str, images: list[bytes], rate: float, n_requests: int) -> dict:
    """`n_requests` sent at a steady `rate` per second whatever the answers (open loop, RawBodyClient);
    the client's own CPU as a share of one core is reported."""
    client = RawBodyClient(url, images)
    await client.post(0)
    cpu, start = time.process_time(), time.perf_counter()

    async def one(index: int) -> tuple[float, bool]:
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        return await client.post(index)

    results = await asyncio.gather(*(one(i) for i in range(n_requests)))
    wall = time.perf_counter() - start
    client_cpu = (time.process_time() - cpu) / wall
    client.close()
    latencies = [s for s, ok in results if ok]
    stats = _latency_stats(latencies, len(latencies), n_requests - len(latencies), wall)
    return {**stats, "rate_per_s": rate, "client_cpu_of_a_core": client_cpu}


def latency(base_url: str, images: list[bytes], served_rate: float, seconds: float) -> dict:
    """Single-request p50 (one connection, closed loop: multipart from httpx as before, and the raw
    body from RawBodyClient) and p95 paced at half of `served_rate` (raw body, RawBodyClient), each from
    a drained prediction log (the wait before each is reported). The ratio compares like with like:
    the paced p95 over the raw-body single p50."""
    url = base_url + "/detect"
    drained = {"single": drain(base_url)}
    single = asyncio.run(closed_loop(url, images, 1, 10_000, seconds))
    drained["single_raw"] = drain(base_url)
    raw = asyncio.run(single_raw(url, images, seconds))
    rate = max(served_rate / 2, 1.0)
    drained["half_load"] = drain(base_url)
    half = asyncio.run(paced(url, images, rate, max(10, int(rate * seconds))))
    return {"single": single, "single_raw": raw, "half_load": half, "drain_before_s": drained,
            "p95_half_load_over_p50_single": half["p95_ms"] / raw["p50_ms"] if raw["p50_ms"] else None}


def open_inference_row(base_url: str, files: list[Path], jpegs: list[bytes], detect_load: dict, detect_latency: dict,
                       args: argparse.Namespace) -> dict:
    """One image per request through the Open Inference Protocol (`/v2/models/NAME/infer`, binary BYTES
    tensor) vs /detect with the image as raw body (`detect_load`) on the same service: images/s under the
    same wrk load and single-request p50, and their ratios (target: each within 10 % of /detect's)."""
    import httpx

    name = httpx.post(base_url + "/detect", content=jpegs[0], headers={"Content-Type": "image/jpeg", **auth_headers()},
                      timeout=60).json()["model"]["name"]
    path = f"/v2/models/{name}/infer"
    load = sustained_wrk(base_url, path, files, "v2", args.connections, args.seconds)
    drain(base_url)
    single = asyncio.run(closed_loop(base_url + path, jpegs, 1, 10_000, args.latency_seconds, mode="v2"))
    print(f"  open inference protocol (binary, {load['connections']} conn): {load['images_per_s']:.1f} img/s "
          f"vs /detect raw {detect_load['images_per_s']:.1f}; single p50 {single['p50_ms']:.1f} ms vs "
          f"{detect_latency['single']['p50_ms']:.1f} ms", flush=True)
    return {"v2_images_per_s": load["images_per_s"], "v2_p50_single_ms": single["p50_ms"],
            "v2_over_detect_images_per_s": load["images_per_s"] / detect_load["images_per_s"],
            "v2_over_detect_p50_single": single["p50_ms"] / detect_latency["single"]["p50_ms"],
            "v2_load": load, "v2_single": single}


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


# --------------------------------------------------------------------------- models
def prepare_models(model_dir: Path, sizes: list[int], precisions: list[str], calib: list[np.ndarray],
                   work: Path) -> dict[tuple[int, str], Path]:
    """A model folder per (imgsz, precision): `best.pt` exported at each size, int8 copies of each."""
    from ultralytics import YOLO

    from evaluation.quantize import quantize_model
    from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE, WEIGHTS_FILE, ModelCard
    from training.train import export_onnx

    card = ModelCard.load(model_dir / CARD_FILE)
    folders = {}
    for size in sizes:
        fp32 = work / f"fp32-{size}"
        fp32.mkdir(parents=True)
        for name in (WEIGHTS_FILE, MODEL_FILE, CARD_FILE, CALIBRATOR_FILE):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, fp32 / name)
        if size != card.imgsz:
            export_onnx(YOLO(str(fp32 / WEIGHTS_FILE)), size, fp32 / MODEL_FILE)
            card.model_copy(update={"imgsz": size}).save(fp32 / CARD_FILE)
        folders[(size, "fp32")] = fp32
        if "int8" in precisions:
            int8 = quantize_model(fp32, work / f"int8-{size}", calib)
            for name in (WEIGHTS_FILE, CALIBRATOR_FILE):
                if (fp32 / name).is_file():
                    shutil.copy2(fp32 / name, int8 / name)
            folders[(size, "int8")] = int8
    return {k: v for k, v in folders.items() if k[1] in precisions}


def cache_hit_jpeg(target_bytes: int = CACHE_HIT_JPEG_BYTES) -> bytes:
    """A synthetic photo-like JPEG of about `target_bytes` (the size the issue measured cache hits at)."""
    import cv2

    from labeling.synthetic import render
    from pipelines.config.base import load_section
    from pipelines.config.data import SynthesizeConfig

    sample = render(load_section(SynthesizeConfig, n_images=1, min_side=900, max_side=1100), 0)
    best = b""
    for quality in range(60, 100, 2):
        data = cv2.imencode(".jpg", sample.image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        if abs(len(data) - target_bytes) < abs(len(best) - target_bytes):
            best = data
    return best


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    """Every row, the cache-hit measurement and the machine; the JSON report."""
    from serving.imaging import decode_image
    from serving.latency import single_request_ms
    from serving.runtime import ModelCard
    from serving.settings import load_serve_config, ort_threads
    from tests.serving_process import (BENCH_OVERRIDES, auth_overrides, detector_service, mint_key, service_env,
                                       synthetic_jpegs)

    model_dir = args.model_dir
    missing = [f for f in ("model.onnx", "model_card.json", "best.pt") if not (model_dir / f).is_file()]
    if missing:
        raise DetopsError(f"{model_dir}: no {', '.join(missing)}; run `make pipeline` first, or pass --model-dir DIR")
    for tool in ("wrk",):
        if not shutil.which(tool):
            raise DetopsError(f"{tool} is not installed (apt-get install {tool})")
    cores = len(os.sched_getaffinity(0))
    card = ModelCard.load(model_dir / "model_card.json")
    jpegs = synthetic_jpegs(args.images)
    calib = [decode_image(j, max_bytes=1 << 30, max_pixels=1 << 30).rgb for j in synthetic_jpegs(80)[64:]]
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="detops-bench-") as tmp:
        work = Path(tmp)
        jpeg_dir = work / "jpegs"
        jpeg_dir.mkdir()
        files = []
        for i, data in enumerate(jpegs):
            files.append(jpeg_dir / f"img{i:03d}.jpg")
            files[-1].write_bytes(data)
        # Authentication on, as in production, with the per-key rates out of the way (capacity is measured);
        # every service of the run checks keys in one job store. wrk_detect.lua sends DETOPS_API_KEY too.
        secured = {**auth_overrides(work), **BENCH_OVERRIDES}
        os.environ["DETOPS_API_KEY"] = mint_key(service_env(work, secured), tenant="bench", scopes="detect")
        print(f"models: {card.name} at {args.sizes}, {args.precisions}", flush=True)
        folders = prepare_models(model_dir, args.sizes, args.precisions, calib, work / "models")
        naive_rates: dict[int, dict] = {}
        for (size, precision), folder in folders.items():
            print(f"[{time.perf_counter() - started:4.0f}s] imgsz {size} {precision}: raw machine", flush=True)
            raw = bench_raw_machine(folder, jpeg_dir, cores, args.engine_seconds)
            print(f"  raw machine: {raw['best_decode_excluded']:.1f} img/s decode excluded, "
                  f"{raw['best_decode_included']:.1f} decode included", flush=True)
            # What the variant gate measures (evaluate's latency_ms_served_single), to compare with the served p50.
            gate_ms = single_request_ms(folder, jpegs, threads=ort_threads(load_serve_config()), repeats=100,
                                        max_upload_bytes=1 << 30, max_pixels=1 << 30)
            with detector_service(folder, work / f"serve-{size}-{precision}",
                                  overrides={"DETOPS_SERVE_CACHE_ENTRIES": "0", **secured}) as server:
                run_wrk(server.url + "/detect", files, "raw", args.connections, 2)  # warm-up
                loads = [sustained_wrk(server.url, "/detect", files, mode, args.connections, args.seconds)
                         for mode in ("raw", "multipart")]
                best = max(loads, key=lambda r: r["images_per_s"])
                lat = latency(server.url, jpegs, best["images_per_s"], args.latency_seconds)
                v2 = open_inference_row(server.url, files, jpegs, loads[0], lat, args)
            for load in loads:
                print(f"  served ({load['mode']}, {load['connections']} conn): {load['images_per_s']:.1f} img/s "
                      f"with the prediction log drained ({load['burst_images_per_s']:.1f} answered, then "
                      f"{load['drain_after_s']:.1f} s of backlog), "
                      f"p50 {load['p50_ms']:.0f} ms, p95 {load['p95_ms']:.0f} ms, client CPU "
                      f"{100 * load['client_cpu_share']:.1f} % of the machine", flush=True)
            if size not in naive_rates:
                with naive_server(folders[(size, "fp32")], size, work) as server:
                    run_wrk(server.url + "/detect", files, "multipart", args.connections, 2)
                    naive_rates[size] = run_wrk(server.url + "/detect", files, "multipart", args.connections,
                                                args.seconds)
                print(f"  naive: {naive_rates[size]['images_per_s']:.1f} img/s", flush=True)
            naive = naive_rates[size]
            raw_machine = raw["best_decode_included"]
            rows.append({
                "imgsz": size, "precision": precision,
                "raw_machine_images_per_s": raw_machine,
                "raw_machine_decode_excluded_images_per_s": raw["best_decode_excluded"],
                "served_images_per_s": best["images_per_s"], "served_body": best["mode"],
                "naive_images_per_s": naive["images_per_s"],
                "served_over_raw": best["images_per_s"] / raw_machine,
                "served_over_raw_decode_excluded": best["images_per_s"] / raw["best_decode_excluded"],
                "served_over_naive": best["images_per_s"] / naive["images_per_s"] if naive["images_per_s"] else None,
                "p50_single_ms": lat["single"]["p50_ms"], "gate_single_ms": gate_ms,
                "p50_single_raw_ms": lat["single_raw"]["p50_ms"], "p95_half_load_ms": lat["half_load"]["p95_ms"],
                "half_load_client_cpu_of_a_core": lat["half_load"]["client_cpu_of_a_core"],
                "p95_half_load_over_p50_single": lat["p95_half_load_over_p50_single"],
                "client_cpu_share": best["client_cpu_share"], **v2,
                "raw": raw, "served_loads": loads, "naive": naive, "latency": lat,
            })
        print(f"[{time.perf_counter() - started:4.0f}s] cache hit", flush=True)
        big = cache_hit_jpeg()
        (work / "big.jpg").write_bytes(big)
        first = folders[min(folders)]
        with detector_service(first, work / "serve-cache", overrides={"DETOPS_SERVE_CACHE_ENTRIES": "64", **secured}) as server:
            url = server.url + "/detect"
            run_wrk(url, [work / "big.jpg"], "raw", 1, 1)  # the first request fills the cache
            hits = {mode: run_wrk(url, [work / "big.jpg"], mode, 1, args.latency_seconds) for mode in ("raw", "multipart")}
        cache = {"jpeg_bytes": len(big), "model": first.name, **{m: {k: h[k] for k in ("requests", "p50_ms", "p95_ms", "p99_ms")}
                                                                for m, h in hits.items()}}
        print(f"  cache hit ({len(big)} B): raw p95 {hits['raw']['p95_ms']:.2f} ms, multipart p95 "
              f"{hits['multipart']['p95_ms']:.2f} ms", flush=True)
    return summarize(rows, cache, {"name": card.name, "trained_imgsz": card.imgsz, "model_dir": str(model_dir),
                                   "images": args.images}, time.perf_counter() - started)


def run_quiet(args: argparse.Namespace) -> dict:
    """`run` `args.runs` times, each after waiting (at most QUIET_WAIT_S) for the 1-minute load average
    to fall below `args.max_load`; a run that starts above it anyway is kept in the report but left out
    of the median. The report's rows, cache hit and targets are the medians of the quiet runs."""
    reports, loads = [], []
    for index in range(args.runs):
        loads.append(wait_for_quiet(args.max_load, QUIET_WAIT_S))
        quiet = loads[-1] <= args.max_load
        print(f"run {index + 1}/{args.runs}: load average {loads[-1]:.2f} at the start"
              f"{'' if quiet else f' (above {args.max_load}: left out of the median)'}", flush=True)
        reports.append(run(args))
    kept = [r for r, load in zip(reports, loads) if load <= args.max_load]
    if not kept:
        raise DetopsError(f"every run started above a load average of {args.max_load}: the machine is not quiet "
                          f"(loads {', '.join(f'{x:.2f}' for x in loads)}); stop what runs beside it, or pass --max-load")
    rows = [median_record([r["rows"][i] for r in kept]) for i in range(len(kept[0]["rows"]))]
    cache = {**kept[0]["cache_hit"], **{mode: median_record([r["cache_hit"][mode] for r in kept])
                                        for mode in ("raw", "multipart")}}
    report = summarize(rows, cache, kept[0]["model"], sum(r["bench_seconds"] for r in reports))
    report["runs"] = [{"load_average_at_start": load, "kept": load <= args.max_load, "rows": r["rows"],
                       "cache_hit": r["cache_hit"]} for r, load in zip(reports, loads)]
    report["median_of"] = len(kept)
    return report


def wait_for_quiet(max_load: float, timeout_s: float) -> float:
    """The 1-minute load average once it is at or below `max_load`, or when `timeout_s` ran out."""
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def median_record(records: list[dict]) -> dict:
    """Field by field: the median of the numbers (None where no run has one; a number every run shares
    as it is), the first run's value for anything else; nested details are dropped (each run's are in
    the report's `runs`)."""
    out: dict = {}
    for key, value in records[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            if not isinstance(value, (dict, list)):
                out[key] = value
            continue
        numbers = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        same = len(numbers) == len(records) and len(set(numbers)) == 1  # e.g. imgsz: kept as it is
        out[key] = numbers[0] if same else statistics.median(numbers) if numbers else None
    return out


# --------------------------------------------------------------------------- report
def machine() -> dict:
    """CPU model, usable cores, the vector instruction sets that matter for the engine, load."""
    flags: set[str] = set()
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "cores": len(os.sched_getaffinity(0)), "avx2": "avx2" in flags,
            "avx512": any(f.startswith("avx512") for f in flags), "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags, "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(), "platform": platform.platform()}


def summarize(rows: list[dict], cache: dict, model: dict, seconds: float) -> dict:
    """The JSON report with the target verdicts (pass/miss; never an assertion)."""
    targets = []
    for row in rows:
        size, label = row["imgsz"], f"{row['imgsz']} {row['precision']}"
        if size in TARGET_SERVED_OVER_RAW:
            targets.append({"what": f"served / raw machine ({label})", "value": row["served_over_raw"],
                            "target": f">= {TARGET_SERVED_OVER_RAW[size]}",
                            "pass": row["served_over_raw"] >= TARGET_SERVED_OVER_RAW[size]})
        if size in TARGET_SERVED_OVER_NAIVE:
            targets.append({"what": f"served / naive ({label})", "value": row["served_over_naive"],
                            "target": f">= {TARGET_SERVED_OVER_NAIVE[size]}",
                            "pass": (row["served_over_naive"] or 0) >= TARGET_SERVED_OVER_NAIVE[size]})
        targets.append({"what": f"/v2 infer / detect images/s ({label})", "value": row["v2_over_detect_images_per_s"],
                        "target": f">= {1 - TARGET_V2_WITHIN}",
                        "pass": row["v2_over_detect_images_per_s"] >= 1 - TARGET_V2_WITHIN})
        targets.append({"what": f"/v2 infer / detect p50 single ({label})", "value": row["v2_over_detect_p50_single"],
                        "target": f"<= {1 + TARGET_V2_WITHIN}",
                        "pass": row["v2_over_detect_p50_single"] <= 1 + TARGET_V2_WITHIN})
        value = row["p95_half_load_over_p50_single"]
        targets.append({"what": f"p95 half load / p50 single, raw body ({label})", "value": value,
                        "target": f"<= {TARGET_HALF_LOAD_P95_OVER_SINGLE}",
                        "pass": value is not None and value <= TARGET_HALF_LOAD_P95_OVER_SINGLE})
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_size.setdefault(row["imgsz"], {})[row["precision"]] = row
    for size, pair in sorted(by_size.items()):
        if {"fp32", "int8"} <= set(pair):  # the served variant must not be slower for one request
            fp32, int8 = pair["fp32"]["p50_single_ms"], pair["int8"]["p50_single_ms"]
            targets.append({"what": f"p50 single int8 / fp32 ({size})", "value": int8 / fp32, "target": "<= 1.0",
                            "pass": int8 <= fp32})
            # The variant gate's in-process ratio must tell what the served one does.
            gate = pair["int8"]["gate_single_ms"] / pair["fp32"]["gate_single_ms"]
            targets.append({"what": f"gate int8/fp32 over served int8/fp32 ({size})", "value": gate / (int8 / fp32),
                            "target": f"within {TARGET_GATE_WITHIN:.0%} of 1",
                            "pass": abs(gate / (int8 / fp32) - 1) <= TARGET_GATE_WITHIN})
    targets.append({"what": f"cache-hit p99 ms ({cache['jpeg_bytes']} B JPEG, raw body)", "value": cache["raw"]["p99_ms"],
                    "target": f"<= {TARGET_CACHE_HIT_P99_MS}", "pass": cache["raw"]["p99_ms"] <= TARGET_CACHE_HIT_P99_MS})
    return {"machine": machine(), "model": model, "bench_seconds": seconds, "rows": rows, "cache_hit": cache,
            "targets": targets}


def print_report(report: dict) -> None:
    """The rows and the targets as tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    m = report["machine"]
    console.print(f"{m['cpu']}, {m['cores']} cores, avx2 {m['avx2']}, avx512 {m['avx512']}; "
                  f"load average at the end {m['load_average_at_end']}")
    if "runs" in report:
        starts = ", ".join(f"{r['load_average_at_start']:.2f}{'' if r['kept'] else ' (left out)'}" for r in report["runs"])
        console.print(f"median of {report['median_of']} of {len(report['runs'])} runs; load average at their "
                      f"starts: {starts}")
    table = Table(title="serving vs the machine's engine (images/s)")
    for col in ("imgsz", "precision", "raw machine (decode incl.)", "raw (decode excl.)", "served", "body",
                "naive", "served/raw", "served/naive", "p50 single ms", "gate ms", "p50 raw ms", "p95 half ms",
                "p95half/p50raw", "wrk CPU %",
                "/v2 infer", "/v2 p50 ms"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        table.add_row(str(r["imgsz"]), r["precision"], f"{r['raw_machine_images_per_s']:.1f}",
                      f"{r['raw_machine_decode_excluded_images_per_s']:.1f}", f"{r['served_images_per_s']:.1f}",
                      r["served_body"], f"{r['naive_images_per_s']:.1f}", f"{r['served_over_raw']:.2f}",
                      f"{r['served_over_naive']:.2f}" if r["served_over_naive"] else "-",
                      f"{r['p50_single_ms']:.1f}", f"{r['gate_single_ms']:.1f}", f"{r['p50_single_raw_ms']:.1f}",
                      f"{r['p95_half_load_ms']:.1f}",
                      f"{r['p95_half_load_over_p50_single']:.2f}" if r["p95_half_load_over_p50_single"] else "-",
                      f"{100 * r['client_cpu_share']:.1f}", f"{r['v2_images_per_s']:.1f}",
                      f"{r['v2_p50_single_ms']:.1f}")
    console.print(table)
    c = report["cache_hit"]
    console.print(f"cache hit, {c['jpeg_bytes']} B JPEG, one keep-alive connection: raw body p50 "
                  f"{c['raw']['p50_ms']:.2f} / p95 {c['raw']['p95_ms']:.2f} / p99 {c['raw']['p99_ms']:.2f} ms; "
                  f"multipart p50 {c['multipart']['p50_ms']:.2f} / p95 {c['multipart']['p95_ms']:.2f} / p99 "
                  f"{c['multipart']['p99_ms']:.2f} ms")
    targets = Table(title="targets (measurement, not a test)")
    for col in ("what", "value", "target", "verdict"):
        targets.add_column(col, justify="right")
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        targets.add_row(t["what"], value, t["target"], "[green]pass[/]" if t["pass"] else "[red]miss[/]")
    console.print(targets)


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the tables, write the JSON; exit 1 on a missed target only with --strict."""
    from pipelines import environment

    environment.configure()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--engine-worker":  # one engine process of (a): prints its images/s
        model_dir, threads, batch, seconds, jpeg_dir, decode = argv[1:7]
        print(engine_rate(Path(model_dir), int(threads), int(batch), float(seconds), Path(jpeg_dir))
              if decode == "1" else _engine_decoded(Path(model_dir), int(threads), int(batch), float(seconds),
                                                    Path(jpeg_dir)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.bench.serving_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"),
                        help="model folder with model.onnx, model_card.json, best.pt (default: models)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 640])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk seconds per load")
    parser.add_argument("--latency-seconds", type=float, default=6.0, help="seconds per latency measurement")
    parser.add_argument("--engine-seconds", type=float, default=3.0, help="seconds per engine measurement")
    parser.add_argument("--images", type=int, default=64, help="distinct synthetic images")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/serving.json"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--runs", type=int, default=3,
                        help="whole runs, each started on a quiet machine; the median of each figure is reported")
    parser.add_argument("--max-load", type=float, default=QUIET_LOAD,
                        help="a run starting above this 1-minute load average is discarded")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: at least 1 run")
    try:
        report = run_quiet(args)
    except DetopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    missed = [t["what"] for t in report["targets"] if not t["pass"]]
    return 1 if args.strict and missed else 0


def _engine_decoded(model_dir: Path, threads: int, batch: int, seconds: float, jpeg_dir: Path) -> float:
    """engine_rate on arrays decoded once up front (decode excluded)."""
    from serving.imaging import decode_image

    images = [decode_image(p.read_bytes(), max_bytes=1 << 30, max_pixels=1 << 30).rgb
              for p in sorted(jpeg_dir.glob("*.jpg"))]
    return engine_rate(model_dir, threads, batch, seconds, None, images)


if __name__ == "__main__":
    sys.exit(main())
