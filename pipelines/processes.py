"""Server processes: start one in its own process group, wait until its health URL answers, stop it
and everything it started by PID. The one supervisor for every server the project starts (the
blue/green colours and nginx of `detops deploy`, Label Studio, MLflow, the test suite's services).

A server started here outlives the Python process that started it when the caller lets it (deploy
keeps PIDs in its state file); `stop` works from any process that knows the PID. Some servers put their
workers in sessions of their own (BentoML's do), out of reach of a signal to the group and orphaned
when their parent dies: `descendants` records them (PID and start time, so a reused PID is never hit)
and `stop` ends them too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import DetopsError

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Server:
    """A running server: its base URL, process id (also its process group id) and log file."""

    url: str
    pid: int
    log: Path


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(log: Path, chars: int = 3000) -> str:
    """The end of a server log, for error messages."""
    return Path(log).read_text(errors="replace")[-chars:] if Path(log).is_file() else "(no log)"


def spawn(argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` in a new session (its own process group, so `stop` reaches the workers it forks
    and nothing else), stdout and stderr appended to `log`."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        try:
            return subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise DetopsError(f"cannot start {argv[0]}: {exc}") from None


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a finished child of ours is reaped, not counted)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(url: str, *, pid: int, log: Path, timeout_s: float,
               ready: Callable[[int], bool] = lambda status: status == 200) -> None:
    """Poll GET `url` until `ready(status)`; a DetopsError with the log's tail when the process exits
    first or `timeout_s` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            raise DetopsError(f"process {pid} exited before {url} answered:\n{log_tail(log)}")
        try:
            if ready(httpx.get(url, timeout=2).status_code):
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.3)
    raise DetopsError(f"{url} did not answer within {timeout_s:.0f} s:\n{log_tail(log)}")


Handle = tuple[int, float]  # a process: (PID, start time) - a PID alone may be reused by another process


def descendants(pid: int) -> list[Handle]:
    """Every process `pid` started, directly or not, whatever its process group or session."""
    import psutil

    try:
        return [(child.pid, child.create_time()) for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def handle(pid: int) -> Handle:
    """The (PID, start time) of a running process, to recognise it later."""
    import psutil

    return pid, psutil.Process(pid).create_time()


def same_process(process: Handle) -> bool:
    """Whether the process `handle` named still runs (not another one that got its PID since)."""
    import psutil

    try:
        return abs(psutil.Process(process[0]).create_time() - process[1]) < 1e-3
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is left (e.g. the workers of a server whose master died)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(pid: int, *, timeout_s: float = 20.0, sig: int = signal.SIGTERM, also: Sequence[Handle] = ()) -> None:
    """Stop process group `pid` with `sig` (the server shuts its workers down gracefully), then SIGKILL
    after `timeout_s` what is left of it, of its descendants and of the processes `also` names (e.g.
    workers recorded when it started, orphaned if it died). A process already gone is fine."""
    import psutil

    leftovers = {*descendants(pid), *also}
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        alive(pid)  # reap it if it was our child
    deadline = time.monotonic() + timeout_s
    while (alive(pid) or _group_alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid) or _group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_deadline = time.monotonic() + 10
        while (alive(pid) or _group_alive(pid)) and time.monotonic() < kill_deadline:
            time.sleep(0.1)
    survivors = []
    for process in leftovers:
        try:
            if same_process(process):
                survivors.append(psutil.Process(process[0]))
        except psutil.Error:
            continue
    if survivors:
        _, still = psutil.wait_procs(survivors, timeout=max(deadline - time.monotonic(), 1.0))
        for child in still:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(still, timeout=10)


@contextmanager
def running(argv: Sequence[str], *, url: str, ready_path: str, log: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None, timeout_s: float = 120.0) -> Iterator[Server]:
    """Run `argv` (serving `url`) until GET `url + ready_path` answers 200, yield it, then stop its
    process group, whatever happens in the block."""
    proc = spawn(argv, log=log, env=env, cwd=cwd)
    try:
        wait_ready(url + ready_path, pid=proc.pid, log=log, timeout_s=timeout_s)
        yield Server(url=url, pid=proc.pid, log=Path(log))
    finally:
        stop(proc.pid)
        proc.wait(timeout=10)
