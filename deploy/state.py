"""The deployment's state and history: one SQLite file in `deploy.state_dir`.

`Stack` is what runs now (the front door's nginx, the two colours: which version each serves, on which
port, with which PID, since when, which colour is live); `Rollout` rows are the history (version,
colours, trigger, start/end, verification figures, verdict, reason). Every command that changes the
stack holds `lock()` so the watcher and a person at the terminal never act at the same time.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pipelines.errors import DetopsError

COLOURS = ("blue", "green")
Colour = Literal["blue", "green"]
DB_FILE = "deploy.db"
LOCK_FILE = "deploy.lock"


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def other(colour: str) -> Colour:
    """The colour that is not `colour`."""
    return "green" if colour == "blue" else "blue"


@dataclass
class ColourProcess:
    """One `bentoml serve` of one pinned registry version."""

    version: str
    model_tag: str  # the BentoML model tag it loads (never `latest`)
    port: int
    pid: int
    started_at: str
    retire_at: str | None = None  # when a warm previous colour is drained and stopped
    workers: list[tuple[int, float]] = field(default_factory=list)  # BentoML's workers: their own sessions


@dataclass
class Stack:
    """What runs now. `live` names the colour nginx routes clients to (None: nothing deployed)."""

    live: Colour | None = None
    live_since: str | None = None
    previous_version: str | None = None  # what was live before; rollback returns to it
    nginx_pid: int | None = None
    colours: dict[str, ColourProcess] = field(default_factory=dict)
    job_workers: list[tuple[int, float]] = field(default_factory=list)  # `detops worker` pools (PID, start time)
    rollout_in_progress: int | None = None  # a rollout id whose command has not finished (or died)
    # After a rollout's switch, while the previous colour is warm: the live version is judged on the
    # requests logged since then. {"rollout": id, "log_offset": access-log offset at the switch,
    # "before": the previous version's live traffic figures just before it}; None: nothing watched.
    after_switch: dict[str, Any] | None = None

    @property
    def live_version(self) -> str | None:
        return self.colours[self.live].version if self.live and self.live in self.colours else None

    @classmethod
    def from_json(cls, text: str) -> Stack:
        data = json.loads(text)
        for v in data.get("colours", {}).values():
            v.pop("retire", None)  # the detached retire process of earlier releases: the watcher retires now
        colours = {k: ColourProcess(**{**v, "workers": [tuple(w) for w in v.get("workers", [])]})
                   for k, v in data.pop("colours", {}).items()}
        job_workers = [tuple(w) for w in data.pop("job_workers", [])]
        return cls(**data, colours=colours, job_workers=job_workers)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Rollout:
    """One rollout (or rollback) and what became of it."""

    id: int
    version: str
    from_version: str | None
    colour: str
    trigger: str  # command, watcher, webhook, rollback
    started_at: str
    ended_at: str | None = None
    verdict: str = "running"  # running, passed, refused, interrupted, rolled_back
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


class DeployState:
    """The stack and the rollout history in `<state_dir>/deploy.db`."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("CREATE TABLE IF NOT EXISTS stack (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT)")
                con.execute("""CREATE TABLE IF NOT EXISTS rollouts (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL, from_version TEXT,
                    colour TEXT NOT NULL, trigger TEXT NOT NULL, started_at TEXT NOT NULL, ended_at TEXT,
                    verdict TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', figures TEXT NOT NULL DEFAULT '{}')""")
        except (OSError, sqlite3.Error) as exc:
            raise DetopsError(f"deploy state {self.dir}: cannot open ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.dir / DB_FILE, timeout=30.0)
        con.execute("PRAGMA busy_timeout=30000")
        return con

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the stack across processes (the watcher, a command); waits for it."""
        with open(self.dir / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def stack(self) -> Stack:
        with self._connect() as con:
            row = con.execute("SELECT body FROM stack WHERE id = 1").fetchone()
        return Stack.from_json(row[0]) if row else Stack()

    def save(self, stack: Stack) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO stack (id, body) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                        (stack.to_json(),))

    def start_rollout(self, version: str, from_version: str | None, colour: str, trigger: str) -> Rollout:
        started = now()
        with self._connect() as con:
            cursor = con.execute("INSERT INTO rollouts (version, from_version, colour, trigger, started_at, verdict) "
                                 "VALUES (?, ?, ?, ?, ?, 'running')", (version, from_version, colour, trigger, started))
        return Rollout(cursor.lastrowid, version, from_version, colour, trigger, started)

    def finish_rollout(self, rollout: Rollout, verdict: str, reason: str = "",
                       figures: dict[str, Any] | None = None) -> Rollout:
        rollout.ended_at, rollout.verdict, rollout.reason = now(), verdict, reason
        rollout.figures = figures if figures is not None else rollout.figures
        with self._connect() as con:
            con.execute("UPDATE rollouts SET ended_at = ?, verdict = ?, reason = ?, figures = ? WHERE id = ?",
                        (rollout.ended_at, verdict, reason, json.dumps(rollout.figures), rollout.id))
        return rollout

    def rollouts(self, last: int = 10) -> list[Rollout]:
        """The last `last` rollouts, newest first."""
        with self._connect() as con:
            rows = con.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY id DESC LIMIT ?", (last,)).fetchall()
        return [_rollout(row) for row in rows]

    def rollout(self, rollout_id: int) -> Rollout | None:
        """One rollout by id."""
        with self._connect() as con:
            row = con.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return _rollout(row) if row else None


_ROLLOUT_COLUMNS = "id, version, from_version, colour, trigger, started_at, ended_at, verdict, reason, figures"


def _rollout(row: tuple) -> Rollout:
    return Rollout(*row[:9], figures=json.loads(row[9]))


def live_version(state_dir: Path) -> str | None:
    """The registry version the deployment in `state_dir` serves now, None when there is none; what
    the job workers run (read only: no lock, no folder created)."""
    if not (Path(state_dir) / DB_FILE).is_file():
        return None
    return DeployState(state_dir).stack().live_version
