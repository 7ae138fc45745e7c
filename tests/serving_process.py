"""Start a real server as a subprocess on a free loopback port, wait until it answers, stop it by PID;
and the synthetic traffic images sent to it.

Shared by the load test (tests/load/run.py), the serving benchmark (tests/bench/serving_bench.py)
and their integration test. `detector_service` is the whole recipe for the BentoML service: import a
local model folder with `detops build --model-dir --no-bento` into a private BENTOML_HOME, then
`bentoml serve serving.service:Detector` on 127.0.0.1 with a private prediction log, so a run never
touches the project's model store or monitoring data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipelines.errors import DetopsError

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Server:
    """A running server: its base URL, process id (also its process group) and log file."""

    url: str
    pid: int
    log: Path


def synthetic_jpegs(n: int) -> list[bytes]:
    """`n` distinct JPEG images drawn like the pipeline's synthetic project (params.yaml `synthesize:`
    sizes and classes), encoded as `synthesize` writes them; rendered in memory, nothing written."""
    import cv2

    from labeling.synthetic import render
    from pipelines.config import load_section, override

    cfg = override(load_section("synthesize"), n_images=n)
    out = []
    for index in range(n):
        ok, encoded = cv2.imencode(".jpg", render(cfg, index).image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise DetopsError(f"could not encode synthetic image {index} as JPEG")
        out.append(encoded.tobytes())
    return out


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(log: Path, chars: int = 3000) -> str:
    """The end of a server log, for error messages."""
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


@contextmanager
def running(argv: Sequence[str], *, port: int, ready_path: str, env: Mapping[str, str], log: Path,
            timeout_s: float = 120.0) -> Iterator[Server]:
    """Run `argv` (which must listen on `port`) until GET `ready_path` answers 200, yield it, then stop
    its whole process group (the server and any workers it forked): SIGTERM, SIGKILL after 20 s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}"
    with open(log, "wb") as out:
        # A new session makes the server its own process group, so stopping it reaches its workers
        # and nothing else.
        proc = subprocess.Popen(list(argv), cwd=ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_ready(proc, url + ready_path, log, timeout_s)
            yield Server(url=url, pid=proc.pid, log=log)
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DetopsError(f"server exited with code {proc.returncode} before it was ready:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise DetopsError(f"server not ready at {url} within {timeout_s:.0f} s:\n{log_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def service_env(workdir: Path, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a private service: BentoML store and prediction log under `workdir`, plus
    DETOPS_SERVE_* `overrides` (serving/settings.py)."""
    return {**os.environ, "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
            "DETOPS_SERVE_PREDICTION_LOG": str(workdir / "predictions"), **(overrides or {})}


def import_model(model_dir: Path, env: Mapping[str, str]) -> str:
    """`detops build --model-dir MODEL_DIR --no-bento` into env's BENTOML_HOME; returns its output."""
    built = subprocess.run([sys.executable, "-m", "pipelines.cli", "build", "--model-dir", str(model_dir),
                            "--no-bento"], cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=180,
                           check=False)
    if built.returncode != 0:
        raise DetopsError(f"detops build --model-dir {model_dir} failed:\n{built.stderr[-3000:]}")
    return built.stdout.strip()


@contextmanager
def detector_service(model_dir: Path, workdir: Path, *, overrides: Mapping[str, str] | None = None,
                     timeout_s: float = 180.0) -> Iterator[Server]:
    """The BentoML Detector serving `model_dir` on a free loopback port until the block ends; ready
    once /readyz answers (the service runs one real inference before it says so)."""
    env = service_env(workdir, overrides)
    import_model(model_dir, env)
    port = free_port()
    argv = [sys.executable, "-m", "bentoml", "serve", "serving.service:Detector", "--host", HOST, "--port", str(port)]
    with running(argv, port=port, ready_path="/readyz", env=env, log=workdir / "serve.log",
                 timeout_s=timeout_s) as server:
        yield server
