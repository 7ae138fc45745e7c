"""Profile a served /detect: `bentoml serve` (as users start it) under `wrk` load, sampled by py-spy.

    python -m tests.bench.profile_service --model-dir models [--mode multipart|raw] [--seconds 15]

Every worker process is sampled (py-spy --subprocesses, active samples only, native frames off) and
each sample is put in the first bucket its stack matches (inference, decode, prediction-log
featurization, ...). The prediction log's featurizer processes (children of the workers) are counted
apart, beside the workers' samples. Prints the share of the workers' samples per bucket and writes the JSON (and
py-spy's collapsed stacks) under --out. Measures whatever machine runs it: state it beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from pipelines.errors import DetopsError

WRK_SCRIPT = Path(__file__).with_name("wrk_detect.lua")
# First match wins: the order puts the specific before the general.
BUCKETS = [
    ("prediction-log featurization", ("image_statistics", "image_embedding", "make_record")),
    ("prediction-log write", ("monitoring/store.py", "monitoring/logger.py")),
    ("inference (onnxruntime)", ("infer (serving/runtime.py", "run (onnxruntime")),
    ("postprocess (NMS, calibration)", ("postprocess (serving/runtime.py",)),
    ("letterbox / to_input", ("letterbox (serving/runtime.py", "to_input (serving/runtime.py")),
    ("decode (PIL, EXIF, RGB)", ("decode_image (serving/imaging.py",)),
    ("hash + cache", ("cache_key", "serving/cache.py", "sha256")),
    ("request parsing (multipart, spooling)", ("multipart", "from_http_request", "python_multipart",
                                               "starlette/formparsers", "tempfile")),
    ("response (JSON, pydantic)", ("detect_response", "model_dump", "json/encoder", "render (starlette")),
]


# How a 'spawn' child's command line starts (py-spy --subprocesses puts it in the stack's process frame):
# the prediction log's featurizer process (monitoring/logger.py), sampled apart from the workers.
FEATURIZER_PROCESS = "multiprocessing.spawn import spawn_main"


def bucket(stack: str) -> str:
    """The bucket of one collapsed py-spy stack."""
    for name, needles in BUCKETS:
        if any(n in stack for n in needles):
            return name
    return "other (event loop, HTTP, BentoML)"


def process_cpu(handles: list[tuple[int, float]]) -> dict[int, tuple[str, float]]:
    """Each live process's command line and CPU seconds so far (user + system); `handles` as
    `pipelines.processes.descendants` gives them."""
    import psutil

    out = {}
    for pid, _ in handles:
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            out[pid] = (" ".join(proc.cmdline()), times.user + times.system)
        except psutil.Error:  # gone meanwhile
            continue
    return out


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two `process_cpu` readings, summed per kind of process."""
    kinds: Counter[str] = Counter()
    for pid, (cmd, secs) in after.items():
        kind = ("featurizers" if FEATURIZER_PROCESS in cmd else "workers" if "worker.service" in cmd else "other")
        kinds[kind] += secs - before.get(pid, (cmd, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(kinds.items())}


def profile(model_dir: Path, mode: str, seconds: float, connections: int, images: int, out: Path) -> dict:
    """Start the service, load it with wrk for `seconds`, sample its workers; the bucket shares."""
    from pipelines.processes import descendants
    from tests.serving_process import (BENCH_OVERRIDES, auth_overrides, detector_service, mint_key, service_env,
                                       synthetic_jpegs)

    # py-spy comes with the virtual environment (its bin/ may not be on PATH), wrk from the system.
    tools = {tool: shutil.which(tool, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
             for tool in ("wrk", "py-spy")}
    for tool, path in tools.items():
        if not path:
            raise DetopsError(f"{tool} is not installed (wrk: apt-get install wrk; py-spy: pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="detops-profile-") as tmp:
        work = Path(tmp)
        files = []
        for i, data in enumerate(synthetic_jpegs(images)):
            files.append(work / f"img{i}.jpg")
            files[-1].write_bytes(data)
        # Authentication on, as in production; wrk_detect.lua sends DETOPS_API_KEY (wrk inherits it).
        overrides = {"DETOPS_SERVE_CACHE_ENTRIES": "0", **auth_overrides(work), **BENCH_OVERRIDES}
        os.environ["DETOPS_API_KEY"] = mint_key(service_env(work, overrides), tenant="bench", scopes="detect")
        with detector_service(model_dir, work, overrides=overrides) as server:
            url = server.url + "/detect"
            subprocess.run(["wrk", "-t1", f"-c{connections}", "-d3s", "-s", str(WRK_SCRIPT), url, "--", mode,
                            *map(str, files)], check=True, capture_output=True, timeout=60)  # warm-up
            wrk = subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{seconds + 4:.0f}s", "-s", str(WRK_SCRIPT),
                                    url, "--", mode, *map(str, files)], stdout=subprocess.PIPE, text=True)
            raw = out / f"pyspy-{mode}.txt"
            cpu_before = process_cpu(descendants(server.pid))
            subprocess.run([tools["py-spy"], "record", "--pid", str(server.pid), "--subprocesses", "--format", "raw",
                            "--duration", str(int(seconds)), "--rate", "200", "--output", str(raw), "--nonblocking"],
                           check=True, capture_output=True, timeout=seconds + 60)
            cpu_after = process_cpu(descendants(server.pid))
            wrk_out, _ = wrk.communicate(timeout=seconds + 60)
            workers = sum("worker.service" in cmd for cmd, _ in cpu_after.values())
    samples: Counter[str] = Counter()
    featurizer: Counter[str] = Counter()  # the prediction log's featurizer processes (children of the workers)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "serving/service.py" in stack or "monitoring/" in stack or "site-packages" in stack:
            (featurizer if FEATURIZER_PROCESS in stack else samples)[bucket(stack)] += int(count)
    total = sum(samples.values())
    result = {"mode": mode, "seconds": seconds, "connections": connections, "processes": workers,
              "wrk": json.loads(wrk_out.strip().splitlines()[-1]), "samples": total,
              "shares": {k: round(v / total, 4) for k, v in samples.most_common()},
              # Beside the workers' samples, not among them: what the niced featurizers took.
              "featurizer_samples": sum(featurizer.values()),
              "featurizer_buckets": dict(featurizer.most_common()),
              # CPU seconds (user + system, /proc) each kind of process used while py-spy sampled: py-spy
              # counts a runnable thread waiting for a core as active, so a niced process's samples
              # overstate what it used on a busy machine; these do not.
              "cpu_s": cpu_by_kind(cpu_before, cpu_after)}
    (out / f"profile-{mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, profile, print the shares."""
    from pipelines import environment

    environment.configure()
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile_service", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--mode", choices=["multipart", "raw"], default="multipart")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    try:
        result = profile(args.model_dir, args.mode, args.seconds, args.connections, args.images, args.out)
    except (DetopsError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
