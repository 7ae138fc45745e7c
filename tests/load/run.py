"""`make loadtest`: a bounded Locust run against a real, private BentoML service.

1. the model folder (`models/` by default, the default pipeline's output) is imported with
   `detops build --model-dir --no-bento` into a private BENTOML_HOME;
2. `bentoml serve serving.service:Detector` starts on 127.0.0.1 on a free port (private prediction
   log, result cache off by default so every request runs the model), and is ready at /readyz;
3. Locust runs headless for a bounded time (tests/load/locustfile.py), writing
   `<out>/locust_*.csv` and `<out>/locust.html`;
4. the service is stopped by PID, a summary is printed, and the exit code is Locust's: 1 when an SLO
   (p95 latency, failure ratio) is missed, which the locustfile decides in its `quitting` listener.

Settings come from the `loadtest:` section of params.yaml (`LoadTestConfig`), then the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.config.base import load_section, override
from pipelines.config.serving import LoadTestConfig
from pipelines.errors import DetopsError

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
IMAGES_ENV = "DETOPS_LOAD_IMAGES"  # a folder of images the locustfile sends instead of synthetic ones


def load_config(params: Path | None = None) -> LoadTestConfig:
    """The `loadtest:` section of params.yaml ($DETOPS_PARAMS or ./params.yaml)."""
    return load_section(LoadTestConfig, params)


@dataclass(frozen=True)
class SloVerdict:
    """Whether a run met its SLOs, and why not."""

    p95_ms: float
    failure_ratio: float
    requests: int
    missed: list[str]

    @property
    def ok(self) -> bool:
        return not self.missed


def evaluate_slo(*, requests: int, failures: int, p95_ms: float, max_p95_ms: float,
                 max_failure_ratio: float) -> SloVerdict:
    """Compare a run's totals with the SLO thresholds; a run without a single request misses."""
    ratio = failures / requests if requests else 1.0
    missed = []
    if not requests:
        missed.append("no request completed")
    if p95_ms > max_p95_ms:
        missed.append(f"p95 latency {p95_ms:.0f} ms > {max_p95_ms:.0f} ms")
    if ratio > max_failure_ratio:
        missed.append(f"failure ratio {ratio:.2%} > {max_failure_ratio:.2%} ({failures}/{requests})")
    return SloVerdict(p95_ms=p95_ms, failure_ratio=ratio, requests=requests, missed=missed)


def locust_argv(cfg: LoadTestConfig, host: str) -> list[str]:
    """The headless Locust command line for `cfg` against `host`."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
            "-u", str(cfg.users), "-r", str(cfg.spawn_rate), "-t", cfg.run_time,
            "--csv", str(cfg.out / "locust"), "--html", str(cfg.out / "locust.html"), "--only-summary",
            "--slo-p95-ms", str(cfg.max_p95_ms), "--slo-failure-ratio", str(cfg.max_failure_ratio),
            "--batch-images", str(cfg.batch_images), "--synthetic-images", str(cfg.synthetic_images)]


def run_locust(cfg: LoadTestConfig, host: str, key: str | None = None) -> int:
    """Run Locust to completion (bounded by `cfg.run_time`) with API key `key` (else DETOPS_API_KEY's);
    returns its exit code."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if key is not None:
        env["DETOPS_API_KEY"] = key
    if cfg.images is not None:
        env[IMAGES_ENV] = str(cfg.images.resolve())
    seconds = int(cfg.run_time[:-1]) * {"s": 1, "m": 60, "h": 3600}[cfg.run_time[-1]]
    # Generous margin for start-up (imports, image rendering); a hung run is killed.
    return subprocess.run(locust_argv(cfg, host), cwd=ROOT, env=env, timeout=seconds + 180, check=False).returncode


def print_summary(summary_file: Path, code: int) -> None:
    """A table per endpoint (requests, failures, rps, p50/p95/p99 ms) and the SLO verdict, from the
    summary the locustfile writes when Locust quits."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not summary_file.is_file():
        console.print(f"[red]no summary ({summary_file}): Locust did not finish; exit code {code}[/]")
        return
    summary = json.loads(summary_file.read_text())
    table = Table(title=f"Locust: {summary['users']} users, {summary['run_time_s']} s")
    for col in ("endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="left" if col == "endpoint" else "right")
    for row in summary["endpoints"] + [summary["total"]]:
        table.add_row(row["name"], str(row["requests"]), str(row["failures"]), f"{row['rps']:.2f}",
                      *(f"{row[k]:.0f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")))
    console.print(table)
    for err in summary["errors"]:
        console.print(f"  {err['occurrences']} x {err['error'][:300]}")
    slo = summary["slo"]
    status = "[green]met[/]" if slo["met"] else "[red]missed: " + "; ".join(slo["missed"]) + "[/]"
    console.print(f"SLO (p95 <= {slo['max_p95_ms']:.0f} ms, failures <= {slo['max_failure_ratio']:.2%}): {status}")
    console.print(f"reports: {summary_file.parent / 'locust.html'}, {summary_file.parent}/locust_*.csv; "
                  f"exit code {code}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the service, run Locust, stop the service, summarize."""
    from pipelines import environment

    environment.configure()
    parser = argparse.ArgumentParser(prog="python -m tests.load.run", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="model folder (default loadtest.model_dir: models)")
    parser.add_argument("--users", type=int)
    parser.add_argument("--spawn-rate", type=float)
    parser.add_argument("--run-time", help="e.g. 30s, 2m")
    parser.add_argument("--out", type=Path, help="report folder (default reports/load)")
    parser.add_argument("--images", type=Path, help="folder of images to send instead of synthetic ones")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the service's result cache on")
    args = parser.parse_args(argv)
    try:
        cfg = override(load_config(), **vars(args))
        if not (cfg.model_dir / "model.onnx").is_file():
            raise DetopsError(f"{cfg.model_dir}: no model.onnx; run `make pipeline` first, or pass --model-dir DIR")
        return _run(cfg)
    except DetopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(cfg: LoadTestConfig) -> int:
    from tests.serving_process import BENCH_OVERRIDES, auth_overrides, detector_service, mint_key, service_env

    with tempfile.TemporaryDirectory(prefix="detops-load-") as tmp:
        workdir = Path(tmp)
        # Authentication on, as in production: Locust sends a key of its own tenant.
        overrides = {**auth_overrides(workdir), **BENCH_OVERRIDES,
                     **({} if cfg.cache else {"DETOPS_SERVE_CACHE_ENTRIES": "0"})}
        key = mint_key(service_env(workdir, overrides), tenant="loadtest", scopes="detect")
        try:
            with detector_service(cfg.model_dir, workdir, overrides=overrides) as server:
                print(f"service ready at {server.url} (pid {server.pid}); Locust for {cfg.run_time}, "
                      f"{cfg.users} users", flush=True)
                code = run_locust(cfg, server.url, key)
        finally:
            if (workdir / "serve.log").is_file():  # kept for post-mortems
                cfg.out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(workdir / "serve.log", cfg.out / "serve.log")
    print_summary(cfg.out / "locust_summary.json", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
