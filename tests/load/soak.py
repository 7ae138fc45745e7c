"""`make soak` (not a test): a steady moderate load for a long time (default 10 minutes) across /detect
and jobs, by two tenants with their own keys, against a real service with authentication on and a real
`detops worker`; reports errors (target 0), p95 per endpoint and the RSS of every process, the service's
workers, their featurizers and the job workers included: its series per minute, and its growth from the
end of the warm-up to the end of the run (target <= 5 %), with the same processes (PIDs) at both ends —
a worker that was restarted or recycled fails the run as surely as one that grew.

The service (2 BentoML workers), the job store (SQLite), the embedded broker and the object store live
in a temporary folder; the model folder (`--model-dir`, default loadtest.model_dir) is imported into a
private BentoML home and registered in a private MLflow registry as the workers' @champion.
The warm-up is 5 minutes (a sixth of the run when that is shorter): `make soak SOAK_TIME=30m` measures
minute 5 -> 30, a process's RSS at each mark being the lowest of its samples (every 5 s) in the minute
before it. Exit code 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = Path(__file__).with_name("soak_locustfile.py")
PEPPER = "soak-only-pepper-0123456789abcdef"
WARMUP_S = 300
MAX_RSS_GROWTH_PCT = 5.0


def _seconds(text: str) -> int:
    """`30s`, `10m`, `1h` -> seconds (an argparse type: anything else is a usage error naming it)."""
    units = {"s": 1, "m": 60, "h": 3600}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number and s, m or h (30s, 10m, 1h)")
    return int(text[:-1]) * units[text[-1]]


class RssSampler:
    """Every `interval_s`, the RSS of each process under the given roots (children included)."""

    def __init__(self, roots: dict[str, int], interval_s: float) -> None:
        self.roots, self.interval_s = roots, interval_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            now: dict[str, int] = {}
            for name, pid in self.roots.items():
                try:
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        now[f"{name}:{p.pid}:{' '.join(p.cmdline()[1:4])[:60]}"] = p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.samples.append((time.monotonic(), now))
            self._stop.wait(self.interval_s)

    def growth(self, warmup_s: float, window_s: float = 60.0) -> tuple[list[dict[str, object]], list[str]]:
        """Per process alive at both ends: its RSS at the end of the warm-up and at the end of the run,
        growth in %; and the processes alive at only one of the two ends (restarted, recycled or gone).
        The RSS at a mark is the lowest sample of the `window_s` before it: a leak raises that floor,
        a buffer held for a moment (the featurizers swing by ±5 % batch to batch) does not."""
        if not self.samples:
            return [], []
        t0, t_end = self.samples[0][0], self.samples[-1][0]
        t_base = next((t for t, _ in self.samples if t - t0 >= warmup_s), t0)
        base, last = self._floor(t_base - window_s, t_base), self._floor(t_end - window_s, t_end)
        rows = [{"process": name, "rss_start_mb": round(base[name] / 2**20, 1), "rss_end_mb": round(last[name] / 2**20, 1),
                 "growth_pct": round(100 * (last[name] - base[name]) / base[name], 1)}
                for name in sorted(set(base) & set(last))]
        return rows, sorted(set(base) ^ set(last))

    def _floor(self, since: float, until: float) -> dict[str, int]:
        """Each process's lowest RSS among the samples taken in [since, until], if it is alive at `until`."""
        window = [rss for t, rss in self.samples if since <= t <= until]
        return {name: min(rss[name] for rss in window if name in rss) for name in window[-1]}

    def per_minute(self) -> dict[str, list[float | None]]:
        """Each process's RSS in MB at every whole minute of the run (None: not alive then)."""
        if not self.samples:
            return {}
        t0 = self.samples[0][0]
        marks: dict[int, dict[str, int]] = {}
        for t, rss in self.samples:
            marks.setdefault(int((t - t0) // 60), rss)
        names = sorted({name for rss in marks.values() for name in rss})
        return {name: [round(rss[name] / 2**20, 1) if name in rss else None for rss in marks.values()]
                for name in names}


def main(argv: list[str] | None = None) -> int:
    from pipelines import environment
    from pipelines.config.base import load_section
    from pipelines.config.serving import LoadTestConfig

    environment.configure()
    cfg = load_section(LoadTestConfig)
    parser = argparse.ArgumentParser(prog="python -m tests.load.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=cfg.model_dir)
    parser.add_argument("--run-time", default="10m", type=_seconds, help="e.g. 30s, 10m")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("reports/soak"))
    args = parser.parse_args(argv)
    if not (args.model_dir / "model.onnx").is_file():
        print(f"error: {args.model_dir}: no model.onnx; run `make pipeline` first, or pass --model-dir DIR",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="detops-soak-") as tmp:
        return _soak(args, Path(tmp))


def _soak(args: argparse.Namespace, tmp: Path) -> int:
    import mlflow

    from pipelines.registry import set_champion
    from tests.jobs_services import register_model_dir, start_worker
    from tests.serving_process import detector_service

    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {"DETOPS_KEY_PEPPER": PEPPER, "DETOPS_GATEWAY_AUTH": "true", "DETOPS_DATABASE_URL": f"sqlite:///{tmp / 'jobs.db'}",
           "DETOPS_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.db'}", "DETOPS_OBJECT_STORE_URL": str(tmp / "objects"),
           "DETOPS_JOBS_DATA_DIR": str(tmp / "jobs"), "MLFLOW_TRACKING_URI": mlflow_uri, "DETOPS_CACHE_DIR": str(tmp / "cache"),
           "DETOPS_SERVE_CACHE_ENTRIES": "0"}
    os.environ.update(env)
    mlflow.set_tracking_uri(mlflow_uri)
    set_champion("detops-soak", register_model_dir(args.model_dir, "detops-soak"), reason="soak")
    keys = []
    for tenant in ("soak-a", "soak-b"):
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", "keys", "create", "--tenant", tenant, "--scopes",
                              "detect,jobs:write,jobs:read"], cwd=ROOT, env={**os.environ}, capture_output=True,
                             text=True, check=True).stdout
        keys.append(out.strip().splitlines()[-1])
    with detector_service(args.model_dir, tmp, overrides=env) as server:
        # The workers load the registry's detops-soak@champion; the service imported the same folder.
        worker = start_worker({**os.environ, **env, "DETOPS_SERVE_MODEL_NAME": "detops-soak"}, tmp / "worker.log",
                              concurrency=1)
        sampler = RssSampler({"service": server.pid, "jobs-worker": worker.pid}, interval_s=5)
        sampler.start()
        seconds = args.run_time
        print(f"soak: {server.url}, {args.users} users, two tenants, {seconds} s", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", server.url,
                            "-u", str(args.users), "-r", "2", "-t", f"{seconds}s", "--csv", str(args.out / "soak"),
                            "--only-summary", "--exit-code-on-error", "0"], cwd=ROOT,
                           env={**os.environ, "DETOPS_SOAK_KEYS": ",".join(keys), "PYTHONPATH": str(ROOT)},
                           timeout=seconds + 300, check=False)
        finally:
            sampler.stop()
            worker.stop()
    series = [{"t_s": round(t - sampler.samples[0][0], 1), "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()}}
              for t, rss in sampler.samples]
    (args.out / "soak_rss.json").write_text(json.dumps(series))  # to tell a plateau from a leak
    _print_series(sampler.per_minute())
    return _report(args.out, *sampler.growth(warmup_s=min(WARMUP_S, seconds / 6)))


def _print_series(per_minute: dict[str, list[float | None]]) -> None:
    if not per_minute:
        return
    minutes = len(next(iter(per_minute.values())))
    print("RSS (MB) at minute " + " ".join(f"{m:>6}" for m in range(minutes)))
    for name, values in per_minute.items():
        print(f"  {name}")
        print(" " * 19 + " ".join(f"{v:>6.0f}" if v is not None else f"{'-':>6}" for v in values))


def _report(out: Path, growth: list[dict[str, object]], changed: list[str]) -> int:
    stats = list(csv.DictReader((out / "soak_stats.csv").open()))
    rows = [{"endpoint": r["Name"], "requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
             "p95_ms": float(r["95%"] or 0)} for r in stats]
    total = next(r for r in rows if r["endpoint"] == "Aggregated")
    worst = max((g["growth_pct"] for g in growth), default=0.0)
    met = total["failures"] == 0 and worst <= MAX_RSS_GROWTH_PCT and not changed and total["requests"] > 0
    summary = {"endpoints": rows, "errors": total["failures"], "requests": total["requests"], "rss": growth,
               "max_rss_growth_pct": worst, "processes_changed": changed, "met": met}
    (out / "soak.json").write_text(json.dumps(summary, indent=2))
    for r in rows:
        print(f"{r['endpoint']:<24} {r['requests']:>7} requests {r['failures']:>5} failures  p95 {r['p95_ms']:.0f} ms")
    for g in growth:
        print(f"RSS {g['process']:<70} {g['rss_start_mb']:>8} -> {g['rss_end_mb']:>8} MB ({g['growth_pct']:+.1f} %)")
    for name in changed:
        print(f"process alive at only one end of the measurement (restarted or recycled): {name}")
    print(f"soak {'met' if met else 'MISSED'} its targets (0 errors, RSS growth <= {MAX_RSS_GROWTH_PCT} %, "
          f"the same processes): {total['failures']} errors, max RSS growth {worst:+.1f} %, "
          f"{len(changed)} processes changed; {out / 'soak.json'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
