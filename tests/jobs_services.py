"""Servers the job tests and the jobs benchmark start for themselves, never touching the machine's
shared ones: a PostgreSQL database of their own (on the shared server, dropped afterwards) or a
PostgreSQL server of their own (initdb in a temporary folder, killable), a Redis server with AOF on a
free port, a RabbitMQ node of their own (own name, ports and data folder), a TCP proxy that can be
cut, a webhook receiver that dedupes by delivery id, and `detops worker` processes; and the checks
every fault of the job tests ends with (`check_jobs`, `check_job_status`, `check_webhooks`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
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
from pipelines.processes import HOST, alive, descendants, free_port, log_tail, spawn, stop
from serving.jobs.webhooks import EVENT_ID_HEADER

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


# --------------------------------------------------------------------------- Redis, RabbitMQ, PostgreSQL
@dataclass
class Broker:
    """A server started by a test (a broker, or a database): restartable on the same port with the
    same data; `stop` is graceful (SIGTERM), `kill` is a crash (SIGKILL of the server's main process)."""

    url: str
    start: Callable[[], None]
    stop: Callable[[], None]
    kill: Callable[[], None]


@contextmanager
def _restartable(argv: list[str], *, port: int, url: str, log: Path, env: Mapping[str, str] | None = None,
                 start_timeout_s: float = 60.0, stop_timeout_s: float = 20.0, stop_signal: int = signal.SIGTERM,
                 ready: Callable[[], bool] | None = None) -> Iterator[Broker]:
    """A server started now, stoppable (`stop_signal`), killable and startable again (same port, same
    data), stopped at the end. `ready`: what says it serves once its port is open (default: the open
    port)."""
    state: dict[str, int] = {}

    def start() -> None:
        proc = spawn(argv, log=log, env=env)
        state["pid"] = proc.pid
        wait_port(port, pid=proc.pid, log=log, timeout_s=start_timeout_s)
        if ready is not None:
            wait_until(ready, timeout_s=start_timeout_s, what=f"{argv[0]} on port {port} to be ready", interval_s=0.3)

    def halt() -> None:
        stop(state.pop("pid"), timeout_s=stop_timeout_s, sig=stop_signal)

    def kill() -> None:
        pid = state.pop("pid")
        orphans = descendants(pid)
        os.kill(pid, signal.SIGKILL)
        # What it had started exits on its own (PostgreSQL's backends see their postmaster die); the
        # rest is stopped, so that a restart finds the port and the shared memory free.
        stop(pid, timeout_s=30, also=orphans)

    start()
    try:
        yield Broker(url=url, start=start, stop=halt, kill=kill)
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


@contextmanager
def postgres_server() -> Iterator[Broker]:
    """A PostgreSQL server of the test's own: `initdb` in a temporary folder (owned by the `postgres`
    user, as whom the server runs when the tests run as root, as on CI), on a free port, sockets in
    that folder; yields it (url: its `postgres` database) and deletes the folder afterwards."""
    import tempfile

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise DetopsError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                          "(apt-get install postgresql)")
    bindir = found[-1].parent
    as_postgres = (["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
                   if os.geteuid() == 0 else [])  # PostgreSQL refuses to run as root
    folder = Path(tempfile.mkdtemp(prefix="detops-pg-"))
    try:
        if as_postgres:
            shutil.chown(folder, "postgres", "postgres")
        data = folder / "data"
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        port = free_port()
        argv = [*as_postgres, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                "-c", f"listen_addresses={HOST}"]

        def ready() -> bool:
            return subprocess.run([str(bindir / "pg_isready"), "-h", HOST, "-p", str(port), "-q"],
                                  timeout=10).returncode == 0

        with _restartable(argv, port=port, url=f"postgresql+psycopg://postgres@{HOST}:{port}/postgres",
                          log=folder.parent / f"{folder.name}.log", ready=ready,
                          stop_signal=signal.SIGINT) as server:  # fast shutdown: clients need not leave first
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        (folder.parent / f"{folder.name}.log").unlink(missing_ok=True)


# --------------------------------------------------------------------------- webhook receiver
@dataclass
class WebhookReceiver:
    """An HTTP server that records every POST; it answers `fail_with` (e.g. 503) while that is set,
    and only after `delay_s` while that is set (a sender that times out then sends again what this
    receiver already took). Like any receiver of at-least-once webhooks, it acts once per delivery id
    (`X-Detops-Event-Id`): `delivery_ids` is what it took for a job, `check_webhooks` the check."""

    url: str
    received: list[dict] = field(default_factory=list)
    fail_with: int | None = None
    delay_s: float = 0.0

    def posts(self, job_id: str) -> list[dict]:
        """Every POST whose body names the job, in arrival order."""
        return [d for d in list(self.received) if json.loads(d["body"]).get("job_id") == job_id]

    def delivery_ids(self, job_id: str) -> list[str]:
        """The delivery id of each POST of the job this receiver took (answered 2xx)."""
        return [{k.lower(): v for k, v in d["headers"].items()}.get(EVENT_ID_HEADER.lower(), "")
                for d in self.posts(job_id) if 200 <= d["status"] < 300]


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status = receiver.fail_with or 200
            receiver.received.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                      "status": status, "at": time.time()})
            time.sleep(receiver.delay_s)
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
                 store_url: str | None = None, mutant: str | None = None) -> Worker:
    """`detops worker` as a user starts it, in its own process group; returns once its heartbeat
    is in the job store (`store_url`, default env's DETOPS_DATABASE_URL). `mutant`: a worker mutant
    of tests/mutants/jobs.py installed first."""
    from serving.jobs.store import JobStore

    entry = ["tests.mutants.jobs", mutant, "--"] if mutant else ["pipelines.cli"]
    proc = spawn([sys.executable, "-m", *entry, "worker", "--concurrency", str(concurrency)],
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



# --------------------------------------------------------------------------- the checks of every fault
@dataclass(frozen=True)
class FaultRow:
    """One row of the fault table: what `check_jobs` found after a fault."""

    fault: str
    jobs: int
    images: int
    succeeded: int
    results_per_image: str  # "1" when every image has exactly one result row, else "min-max"
    ran_twice: int  # images claimed more than once (at-least-once work), from their attempt counts
    webhooks: str  # "<jobs whose webhook this receiver took once> of <jobs> (<POSTs>)", "-" without one

    def line(self) -> str:
        return (f"fault: {self.fault:<58} jobs {self.jobs:2d}  images {self.images:4d}  succeeded {self.succeeded:4d}"
                f"  results/image {self.results_per_image}  ran twice {self.ran_twice:3d}  webhooks {self.webhooks}")


def expected_status(statuses: list[str], total: int) -> str:
    """What a finished job's status must be, from its images' result statuses alone (written here,
    not taken from the product, so that a product that decides otherwise is caught)."""
    succeeded = statuses.count("succeeded")
    if len(statuses) == total and succeeded == total:
        return "succeeded"
    return "failed" if succeeded == 0 else "partial"


def _rows(store: object, job_ids: list[str]) -> tuple[dict, dict, dict]:
    """(jobs by id, images by (job, index) -> attempts, result rows by (job, index) -> [(status, body)])."""
    from sqlalchemy import select

    from serving.jobs.store import job_images, job_results, jobs

    with store.engine.connect() as conn:  # type: ignore[attr-defined]
        found = {r.job_id: r for r in conn.execute(select(jobs).where(jobs.c.job_id.in_(job_ids)))}
        attempts = {(r.job_id, r.image_index): r.attempts for r in conn.execute(
            select(job_images.c.job_id, job_images.c.image_index, job_images.c.attempts)
            .where(job_images.c.job_id.in_(job_ids)))}
        results: dict[tuple[str, int], list[tuple[str, str | None]]] = {}
        for r in conn.execute(select(job_results.c.job_id, job_results.c.image_index, job_results.c.status,
                                     job_results.c.body).where(job_results.c.job_id.in_(job_ids))):
            results.setdefault((r.job_id, r.image_index), []).append((r.status, r.body))
    return found, attempts, results


def wait_ended(store: object, job_ids: list[str], *, what: str, timeout_s: float = 180.0) -> None:
    """Wait until every job of `job_ids` has ended (a finished or cancelled status)."""
    from serving.jobs.store import ENDED, StoreUnavailable

    def ended(job_id: str) -> bool:
        try:
            job = store.get_job(job_id)  # type: ignore[attr-defined]
        except StoreUnavailable:
            return False
        return job is not None and job.status in ENDED

    for job_id in job_ids:
        wait_until(lambda j=job_id: ended(j), timeout_s=timeout_s, what=f"job {job_id} to end after: {what}")


def check_job_status(store: object, job_id: str) -> str:
    """The job has ended with the status its result rows call for (`expected_status`); returns it."""
    found, _, results = _rows(store, [job_id])
    job = found[job_id]
    statuses = [status for (_, _), rows in results.items() for status, _ in rows]
    expected = expected_status(statuses, job.total)
    assert job.status == expected, (f"job {job_id} is {job.status!r} but its results call for {expected!r} "
                                    f"({statuses.count('succeeded')} of {job.total} images succeeded)")
    return expected


def check_webhooks(receiver: WebhookReceiver, store: object, job_ids: list[str], *,
                   timeout_s: float = 60.0) -> str:
    """Each job's webhook was taken exactly once after dedupe: every POST the receiver took for the job
    carries one and the same delivery id (no two jobs share one) and names the job's final status.
    Returns "<jobs> of <jobs> (<POSTs taken>)" for the fault table."""
    found, _, _ = _rows(store, job_ids)
    seen: dict[str, str] = {}
    taken = 0
    for job_id in job_ids:
        wait_until(lambda j=job_id: receiver.delivery_ids(j), timeout_s=timeout_s, what=f"the webhook of job {job_id}")
        ids = receiver.delivery_ids(job_id)
        taken += len(ids)
        assert len(set(ids)) == 1, f"job {job_id}: its webhook came with {len(set(ids))} delivery ids {sorted(set(ids))}"
        assert ids[0] not in seen, f"jobs {seen.get(ids[0])} and {job_id} share the delivery id {ids[0]}"
        seen[ids[0]] = job_id
        bodies = [json.loads(d["body"]) for d in receiver.posts(job_id) if 200 <= d["status"] < 300]
        assert {b["status"] for b in bodies} == {found[job_id].status}, (
            f"job {job_id} is {found[job_id].status} but its webhook said {sorted({b['status'] for b in bodies})}")
    return f"{len(seen)} of {len(job_ids)} ({taken} POSTs)"


def check_jobs(store: object, fault: str, job_ids: list[str], *, receiver: WebhookReceiver | None = None,
               timeout_s: float = 180.0) -> FaultRow:
    """The check every fault ends with, on jobs made only of good images: each job ends succeeded,
    every image has exactly one result row and that result succeeded with a /detect body; with a
    `receiver`, each job's webhook was taken once (`check_webhooks`). Work done twice is allowed
    (at-least-once) and counted: images claimed more than once."""
    wait_ended(store, job_ids, what=fault, timeout_s=timeout_s)
    found, attempts, results = _rows(store, job_ids)
    per_image = [len(results.get(key, [])) for key in attempts]
    succeeded = sum(1 for key in attempts for status, body in results.get(key, [])
                    if status == "succeeded" and body and {"image", "detections"} <= json.loads(body).keys())
    webhooks = check_webhooks(receiver, store, job_ids) if receiver is not None else "-"
    row = FaultRow(fault=fault, jobs=len(job_ids), images=len(attempts), succeeded=succeeded,
                   results_per_image="1" if set(per_image) == {1} else f"{min(per_image)}-{max(per_image)}",
                   ran_twice=sum(n > 1 for n in attempts.values()), webhooks=webhooks)
    print(row.line())
    statuses = sorted({job.status for job in found.values()})
    assert statuses == ["succeeded"] and row.results_per_image == "1" and row.succeeded == row.images, (
        f"{fault}: job statuses {statuses}, {row.succeeded} of {row.images} images succeeded, "
        f"results per image {row.results_per_image}")
    return row
