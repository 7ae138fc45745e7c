"""A colour: one `bentoml serve serving.service:Detector` of one registry version, pinned by the BentoML
model tag `detops build` gave it (never `latest`, so the two colours never share a mutable reference),
on its own port, logging to the shared prediction log."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from deploy.state import ColourProcess, now
from pipelines import processes
from pipelines.config.deploy import DeployConfig
from pipelines.config.serving import ServeConfig
from pipelines.errors import DetopsError


class ColourFailed(DetopsError):
    """A colour could not start or answer; the message says why (the end of its log)."""


def port_of(cfg: DeployConfig, colour: str) -> int:
    return cfg.blue_port if colour == "blue" else cfg.green_port


def url_of(cfg: DeployConfig, colour: str) -> str:
    return f"http://{processes.HOST}:{port_of(cfg, colour)}"


def log_of(cfg: DeployConfig, colour: str) -> Path:
    return Path(cfg.state_dir) / "logs" / f"{colour}.log"


def start(cfg: DeployConfig, serve: ServeConfig, colour: str, version: str) -> ColourProcess:
    """Import registry version `version` into the BentoML store and serve it as `colour`; returns once
    its /readyz answers (the service runs one real inference first). ColourFailed when it cannot."""
    from serving.build import import_registry_version

    port = port_of(cfg, colour)
    if not _port_free(port):
        raise ColourFailed(f"{colour}: port {port} (deploy.{colour}_port) is taken by another program")
    model_tag, _ = import_registry_version(serve.model_name, version=version)
    env = {**os.environ,
           "DETOPS_SERVE_MODEL_NAME": serve.model_name,
           "DETOPS_SERVE_STORE_VERSION": model_tag.split(":", 1)[1],
           "DETOPS_SERVE_WORKERS": str(cfg.workers or serve.workers),
           "DETOPS_SERVE_PREDICTION_LOG": str(Path(serve.prediction_log).resolve())}
    log = log_of(cfg, colour)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")  # this start's log only: its tail is the reason when it fails
    argv = [sys.executable, "-m", "bentoml", "serve", "serving.service:Detector", "--host", processes.HOST,
            "--port", str(port)]
    process = processes.spawn(argv, log=log, env=env, cwd=Path.cwd())
    try:
        processes.wait_ready(f"{url_of(cfg, colour)}/readyz", pid=process.pid, log=log, timeout_s=cfg.ready_timeout_s)
    except DetopsError:
        processes.stop(process.pid)
        raise ColourFailed(f"{colour} (v{version}) did not become ready: {_last_error(log)}") from None
    return ColourProcess(version=version, model_tag=model_tag, port=port, pid=process.pid, started_at=now(),
                         workers=processes.descendants(process.pid))


def healthy(cfg: DeployConfig, colour: str, process: ColourProcess | None) -> bool:
    """Whether `colour` runs and says it is ready."""
    if process is None or not processes.alive(process.pid):
        return False
    try:
        return httpx.get(f"{url_of(cfg, colour)}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: ColourProcess | None, *, drain_s: float) -> None:
    """Stop a colour: BentoML finishes in-flight requests on SIGTERM (up to `drain_s`); its workers,
    which live in sessions of their own, are ended too, even when the colour's main process died."""
    if process is not None:
        processes.stop(process.pid, timeout_s=max(drain_s, 5.0), also=process.workers)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a stopped colour's TIME_WAIT is no owner
        try:
            s.bind((processes.HOST, port))
        except OSError:
            return False
    return True


def _last_error(log: Path) -> str:
    """The most telling line of a failed start: the last exception line, else the log's last line."""
    lines = [line.strip() for line in processes.log_tail(log, 20000).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line.lower()]
    return (errors or lines or ["no output"])[-1][:400]
