"""The service's dependencies, probed in the background: the job store and the broker.

A daemon thread probes each every `gateway.dependency_check_s` with `gateway.dependency_timeout_s`;
a dependency shows as down after `gateway.dependency_failures` consecutive failed probes and as up
again after one success, so one slow probe does not flap /readyz. Requests never wait on a probe:
/jobs answers 503 with Retry-After at once while the job store is down (`job_store_down`), and
/readyz reports each dependency in its body with status 200 (a down job store or broker does not
stop this instance from serving /detect, so it must stay routed).

The same thread reads who consumes the jobs (`JobConsumers`): how many job workers heartbeated
within `jobs.worker_lease_s` and how old the oldest queued job is, for the /readyz body, the 202 of
`POST /jobs` and /metrics. No live worker does not make the instance unready either: jobs are
durable and wait for a worker, and /detect still works; /readyz names the condition instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


@dataclass
class DependencyState:
    up: bool = True
    failures: int = 0
    detail: str = "not probed yet"
    checked_at: float = 0.0


def tcp_probe(url: str, timeout_s: float) -> Callable[[], None]:
    """A probe that opens a TCP connection to the URL's host and port (a broker: redis, amqp)."""
    parts = urlsplit(url)
    default = {"redis": 6379, "rediss": 6380, "amqp": 5672, "amqps": 5671}.get(parts.scheme, 0)
    host, port = parts.hostname or "127.0.0.1", parts.port or default

    def probe() -> None:
        if not default:  # the embedded broker (sqla+sqlite: the jobs database itself) or an in-memory one
            return
        with socket.create_connection((host, port), timeout=timeout_s):
            pass

    return probe


class JobConsumers:
    """Who consumes the jobs, as last read by the monitor's thread (see the module docstring).
    `read()` returns (workers that heartbeated within `lease_s`, when the oldest queued job was
    accepted in naive UTC or None); `on_read(alive, oldest_age_s)` publishes it (the /metrics gauges)."""

    def __init__(self, read: Callable[[], tuple[int, datetime | None]], *, lease_s: float,
                 on_read: Callable[[int, float], None] | None = None) -> None:
        self.read = read
        self.lease_s = lease_s
        self.on_read = on_read
        self.alive: int | None = None  # None: not known (not read yet, or the job store is down)
        self.oldest_queued_age_s: float | None = None
        self.detail = "not checked yet"

    def check_once(self) -> None:
        try:
            alive, oldest = self.read()
        except Exception as exc:
            self.alive, self.oldest_queued_age_s = None, None
            self.detail = f"cannot read the workers' heartbeats ({type(exc).__name__})"
            return
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        self.alive = alive
        self.oldest_queued_age_s = None if oldest is None else round(max(0.0, (now - oldest).total_seconds()), 1)
        self.detail = (f"{alive} job worker(s) heartbeated within {self.lease_s:g} s" if alive else
                       f"no job worker is consuming: none heartbeated within {self.lease_s:g} s (jobs.worker_lease_s); "
                       "POST /jobs still stores jobs, they wait until a worker starts (detops worker)")
        if self.on_read is not None:
            self.on_read(alive, self.oldest_queued_age_s or 0.0)

    @property
    def none_alive(self) -> bool:
        """Whether the last read found no live worker (False while unknown)."""
        return self.alive == 0

    def report(self) -> dict[str, object]:
        """The /readyz body's `job_workers`."""
        return {"alive": self.alive, "consuming": None if self.alive is None else self.alive > 0,
                "lease_s": self.lease_s, "oldest_queued_age_s": self.oldest_queued_age_s, "detail": self.detail}


class DependencyMonitor:
    """Background probes of named dependencies, and the job consumers' reading (see the module docstring)."""

    def __init__(self, probes: dict[str, Callable[[], None]], *, interval_s: float, failures_to_down: int,
                 consumers: JobConsumers | None = None) -> None:
        self.probes = probes
        self.consumers = consumers
        self.interval_s = interval_s
        self.failures_to_down = failures_to_down
        self.states = {name: DependencyState() for name in probes}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.check_once()
        self._thread = threading.Thread(target=self._run, name="detops-dependencies", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_once()

    def check_once(self) -> None:
        """Probe every dependency once and update its state."""
        for name, probe in self.probes.items():
            state = self.states[name]
            try:
                probe()
            except Exception as exc:
                state.failures += 1
                state.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                if state.up and state.failures >= self.failures_to_down:
                    log.warning("dependency %s is down (%s)", name, state.detail)
                    state.up = False
            else:
                if not state.up:
                    log.info("dependency %s is up again", name)
                state.up, state.failures, state.detail = True, 0, "ok"
            state.checked_at = time.time()
        if self.consumers is not None:
            self.consumers.check_once()

    def is_up(self, name: str) -> bool:
        state = self.states.get(name)
        return state is None or state.up

    def report(self) -> dict[str, dict[str, object]]:
        """{name: {"up": bool, "detail": str}} for the /readyz body."""
        return {name: {"up": s.up, "detail": s.detail} for name, s in self.states.items()}
