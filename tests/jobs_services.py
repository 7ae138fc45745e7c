"""Servers the job tests and the jobs benchmark start for themselves, never touching the machine's
shared ones: a PostgreSQL database of their own (on the shared server, dropped afterwards), a Redis
server with AOF on a free port, a RabbitMQ node of their own (own name, ports and data folder), a
TCP proxy that can be cut, a webhook receiver, and `detops worker` processes."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipelines.errors import DetopsError
from pipelines.processes import HOST, alive, free_port, log_tail, spawn, stop

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("DETOPS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def wait_until(condition: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy (returned); AssertionError naming `what`
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def wait_port(port: int, *, pid: int, log: Path, timeout_s: float = 60.0) -> None:
    """Wait until 127.0.0.1:`port` accepts connections; DetopsError when the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            raise DetopsError(f"process {pid} exited before port {port} opened:\n{log_tail(log)}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise DetopsError(f"port {port} did not open within {timeout_s:.0f} s:\n{log_tail(log)}")


# --------------------------------------------------------------------------- PostgreSQL
@contextmanager
def postgres_database(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A fresh database on the shared PostgreSQL server, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text

    name = f"detops_jobs_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------------------- TCP proxy
class TcpProxy:
    """A TCP forwarder 127.0.0.1:port -> target that can be cut (listener closed, every connection
    dropped) and restored on the same port: a database becoming unreachable, for real."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
            except OSError:
                pass
            listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --------------------------------------------------------------------------- Redis, RabbitMQ
@dataclass
class Broker:
    """A broker started by a test: restartable on the same port with the same data."""

    url: str
    start: Callable[[], None]
    stop: Callable[[], None]


@contextmanager
def _restartable(argv: list[str], *, port: int, url: str, log: Path, env: Mapping[str, str] | None = None,
                 start_timeout_s: float = 60.0, stop_timeout_s: float = 20.0) -> Iterator[Broker]:
    """A server started now, stoppable and startable again (same port, same data), stopped at the end."""
    state: dict[str, int] = {}

    def start() -> None:
        proc = spawn(argv, log=log, env=env)
        state["pid"] = proc.pid
        wait_port(port, pid=proc.pid, log=log, timeout_s=start_timeout_s)

    def halt() -> None:
        stop(state.pop("pid"), timeout_s=stop_timeout_s)

    start()
    try:
        yield Broker(url=url, start=start, stop=halt)
    finally:
        if "pid" in state:
            halt()


def redis_server(workdir: Path) -> ContextManager[Broker]:
    """redis-server on a free port with AOF on (fsync always), data in `workdir`."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--appendonly", "yes", "--appendfsync", "always",
            "--dir", str(workdir), "--save", ""]
    return _restartable(argv, port=port, url=f"redis://{HOST}:{port}/0", log=workdir / "redis.log")


def rabbitmq_node(workdir: Path) -> ContextManager[Broker]:
    """A RabbitMQ node of its own (name, AMQP and distribution ports, data and log folders, no
    plugins), run as the current user; durable queues survive its restart."""
    server = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # not the wrapper, which switches users
    if not server.is_file():
        raise DetopsError("rabbitmq-server not found (apt-get install rabbitmq-server)")
    port, dist = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rabbitmq.conf").write_text(f"listeners.tcp.local = {HOST}:{port}\nloopback_users = none\n")
    (workdir / "enabled_plugins").write_text("[].\n")
    (workdir / "rabbitmq-env.conf").write_text("")
    env = {**os.environ, "RABBITMQ_NODENAME": f"detops{port}@localhost", "RABBITMQ_NODE_PORT": str(port),
           "RABBITMQ_DIST_PORT": str(dist), "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
           "RABBITMQ_LOG_BASE": str(workdir / "log"), "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
           "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"), "ERL_EPMD_ADDRESS": HOST}
    return _restartable([str(server)], port=port, url=f"amqp://guest:guest@{HOST}:{port}//",
                        log=workdir / "rabbitmq.out", env=env, start_timeout_s=120, stop_timeout_s=60)


# --------------------------------------------------------------------------- webhook receiver
@dataclass
class WebhookReceiver:
    """An HTTP server that records every POST; it answers `fail_with` (e.g. 503) while that is set."""

    url: str
    received: list[dict] = field(default_factory=list)
    fail_with: int | None = None


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status = receiver.fail_with or 200
            receiver.received.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                      "status": status, "at": time.time()})
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    receiver.url = f"http://{HOST}:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- workers
def register_model_dir(model_dir: Path, name: str) -> str:
    """Register a model folder as a new version of `name` in the current MLflow store, laid out
    as `detops register` lays it out (artifacts/model_dir/...); returns the version."""
    import tempfile

    import mlflow

    from evaluation.pyfunc_model import DetectorPyfunc
    from pipelines.registry import MODEL_DIR_ARTIFACT, PYFUNC_NAME
    from pipelines.tracking import ensure_experiment
    from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE

    with tempfile.TemporaryDirectory(prefix="detops-register-") as tmp:
        staged = Path(tmp) / MODEL_DIR_ARTIFACT
        staged.mkdir()
        for file in (MODEL_FILE, CARD_FILE, CALIBRATOR_FILE):
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, staged / file)
        ensure_experiment("tests-jobs")  # artifacts beside the store, never in a ./mlruns of the checkout
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name=PYFUNC_NAME, python_model=DetectorPyfunc(),
                                           artifacts={MODEL_DIR_ARTIFACT: str(staged)}, pip_requirements=[],
                                           registered_model_name=name)
    return str(info.registered_model_version)


@dataclass
class Worker:
    pid: int
    log: Path

    def stop(self) -> None:
        stop(self.pid, timeout_s=30)


def start_worker(env: Mapping[str, str], log: Path, *, concurrency: int = 1, wait_s: float = 120.0,
                 store_url: str | None = None) -> Worker:
    """`detops worker` as a user starts it, in its own process group; returns once its heartbeat
    is in the job store (`store_url`, default env's DETOPS_DATABASE_URL)."""
    from serving.jobs.store import JobStore

    proc = spawn([sys.executable, "-m", "pipelines.cli", "worker", "--concurrency", str(concurrency)],
                 log=log, env=env, cwd=ROOT)
    store = JobStore(store_url or env["DETOPS_DATABASE_URL"])
    try:
        store.create_schema()  # the worker creates it too: whoever comes first
        deadline = time.monotonic() + wait_s
        while not any(w["pid"] == proc.pid for w in _safe_workers(store)):
            if not alive(proc.pid):
                raise DetopsError(f"detops worker exited:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise DetopsError(f"detops worker sent no heartbeat within {wait_s:.0f} s:\n{log_tail(log)}")
            time.sleep(0.3)
    finally:
        store.close()
    return Worker(pid=proc.pid, log=log)


def _safe_workers(store: object) -> list[dict]:
    from serving.jobs.store import StoreUnavailable

    try:
        return store.live_workers(within_s=60)  # type: ignore[attr-defined]
    except StoreUnavailable:
        return []


def job_env(base: Mapping[str, str], **urls: str) -> dict[str, str]:
    """The environment of a service or worker: `base` plus DETOPS_* URLs given by keyword
    (database_url=..., broker_url=..., object_store_url=..., webhook_secret=...)."""
    env = dict(base)
    for key, value in urls.items():
        env[f"DETOPS_{key.upper()}"] = value
    return env



def duplicated_results(store: object, job_ids: list[str]) -> int:
    """How many (job, image index) pairs of `job_ids` hold more than one result row in the store."""
    from sqlalchemy import func, select

    from serving.jobs.store import job_results

    per_image = (select(job_results.c.job_id, job_results.c.image_index, func.count().label("n"))
                 .where(job_results.c.job_id.in_(job_ids))
                 .group_by(job_results.c.job_id, job_results.c.image_index).subquery())
    with store.engine.connect() as conn:  # type: ignore[attr-defined]
        return conn.execute(select(func.count()).select_from(per_image).where(per_image.c.n > 1)).scalar()
