"""The prediction log: one record per served image, read back as a pandas DataFrame for drift and
feedback.

`PredictionStore` is the extension point (four methods plus `save_image`); `SQLiteStore` is the
embedded default: one SQLite file in WAL mode, safe from several threads and processes (BentoML
workers), with kept images as `<location>/images/<sha256>.png`. A PostgreSQL store would implement
the same protocol; `open_store` says so for `postgresql://` URLs.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from pipelines.errors import DetopsError

if TYPE_CHECKING:
    import pandas as pd

DB_FILE = "predictions.db"
SCHEMA_LOCK = ".schema.lock"  # held while a store object creates or upgrades the schema
IMAGE_DIR = "images"
EMBEDDING_PREFIX = "emb_"
BASE_COLUMNS = ["ts", "request_id", "image_sha256", "width", "height", "model_name", "model_version",
                "detections", "image_path", "traffic"]
# Which traffic a record answered: `live` (what clients got), or, during a rollout's verification, the
# new colour's `smoke` check, `shadow` (mirrored live traffic, answer discarded) and `canary` (a share of
# live traffic). Drift and push read live records only.
TRAFFIC = ("live", "shadow", "canary", "smoke")


@dataclass
class PredictionRecord:
    """What the log keeps about one prediction. `detections` is compact JSON:
    `[[x1, y1, x2, y2, class_id, confidence], ...]` in pixels of the original image."""

    ts: datetime
    request_id: str
    image_sha256: str
    width: int
    height: int
    statistics: dict[str, float]
    summary: dict[str, float]
    embedding: np.ndarray
    model_name: str
    model_version: str
    detections: str = "[]"
    image_path: str | None = None
    traffic: str = "live"  # one of TRAFFIC
    tenant: str = "-"  # the API tenant whose request it was (serving/gateway/); "-" for records made offline
    extra: dict[str, float] = field(default_factory=dict)  # room for features added later


@runtime_checkable
class PredictionStore(Protocol):
    """Where prediction records live. Implementations must be safe to call from several threads."""

    def append(self, records: list[PredictionRecord]) -> None:
        """Add records (one transaction)."""

    def read(self, since: datetime | None = None, last_n: int | None = None, *, traffic: str | None = "live",
             model_version: str | None = None) -> pd.DataFrame:
        """Records with ts >= since, the last `last_n` of them, oldest first, flattened: base columns,
        one column per statistic and summary key, `emb_<i>` per embedding dimension. Only `traffic`
        records (default `live`: what clients were answered; None: all) of `model_version` (None: any)."""

    def purge_older_than(self, age: timedelta) -> int:
        """Delete records (and their kept images) older than `age`; return the number of records."""

    def delete_image(self, sha256: str) -> int:
        """Delete every record of one image hash and its kept image file; return the record count."""

    def delete_tenant(self, tenant: str, older_than: timedelta | None = None) -> int:
        """Delete one tenant's records (all, or those older than `older_than`) and the kept images no
        other record refers to; return the record count."""

    def save_image(self, sha256: str, rgb: np.ndarray) -> str:
        """Keep the raw image (lossless) under the store; return its path."""


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


class SQLiteStore:
    """The default store: `<root>/predictions.db` (WAL) and `<root>/images/`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.db_path = self.root / DB_FILE
            self.image_dir = self.root / IMAGE_DIR
            self._local = threading.local()
            # Workers open the store at the same time: one at a time creates or upgrades the schema (two
            # that both saw a column missing would both add it; two switching to WAL at once can collide).
            with open(self.root / SCHEMA_LOCK, "a") as lock, self._connect() as con:
                fcntl.flock(lock, fcntl.LOCK_EX)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("""CREATE TABLE IF NOT EXISTS predictions (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, request_id TEXT,
                    image_sha256 TEXT NOT NULL, width INTEGER, height INTEGER, model_name TEXT,
                    model_version TEXT, features TEXT NOT NULL, embedding BLOB NOT NULL,
                    detections TEXT NOT NULL, image_path TEXT, traffic TEXT NOT NULL DEFAULT 'live',
                    tenant TEXT NOT NULL DEFAULT '-')""")
                columns = {row[1] for row in con.execute("PRAGMA table_info(predictions)")}
                if "traffic" not in columns:  # a store written before traffic was recorded: all live
                    con.execute("ALTER TABLE predictions ADD COLUMN traffic TEXT NOT NULL DEFAULT 'live'")
                if "tenant" not in columns:  # a store written before tenants existed
                    con.execute("ALTER TABLE predictions ADD COLUMN tenant TEXT NOT NULL DEFAULT '-'")
                con.execute("CREATE INDEX IF NOT EXISTS predictions_tenant ON predictions (tenant, ts)")
                con.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
                con.execute("CREATE INDEX IF NOT EXISTS predictions_sha ON predictions (image_sha256)")
        except (OSError, sqlite3.Error) as exc:
            raise DetopsError(f"prediction store {self.root}: cannot open ({exc})") from None

    def __getstate__(self) -> dict:
        # Picklable (the prediction log's featurizer process gets its store so): the per-thread
        # connections stay behind, the other process opens its own.
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        # One connection per thread (sqlite3 connections must not be shared across threads); the busy
        # timeout lets writers from other processes take turns instead of failing on a locked file.
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def append(self, records: list[PredictionRecord]) -> None:
        """Add records in one transaction."""
        if not records:
            return
        bad = {r.traffic for r in records} - set(TRAFFIC)
        if bad:
            raise ValueError(f"unknown traffic {sorted(bad)} (expected one of {TRAFFIC})")
        rows = [(_utc(r.ts).timestamp(), r.request_id, r.image_sha256, int(r.width), int(r.height),
                 r.model_name, r.model_version, json.dumps({**r.statistics, **r.summary, **r.extra}),
                 np.asarray(r.embedding, dtype=np.float32).tobytes(), r.detections, r.image_path, r.traffic,
                 r.tenant) for r in records]
        con = self._connect()
        with con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany("""INSERT INTO predictions (ts, request_id, image_sha256, width, height,
                model_name, model_version, features, embedding, detections, image_path, traffic, tenant)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", rows)

    def read(self, since: datetime | None = None, last_n: int | None = None, *, traffic: str | None = "live",
             model_version: str | None = None) -> pd.DataFrame:
        """See `PredictionStore.read`."""
        if last_n is not None and last_n < 1:
            raise DetopsError(f"last_n must be >= 1 (got {last_n})")
        query, args = "SELECT ts, request_id, image_sha256, width, height, model_name, model_version, " \
                      "detections, image_path, traffic, features, embedding FROM predictions", []
        where = []
        for condition, value in (("ts >= ?", None if since is None else _utc(since).timestamp()),
                                 ("traffic = ?", traffic), ("model_version = ?", model_version)):
            if value is not None:
                where.append(condition)
                args.append(value)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY ts DESC, id DESC"
        if last_n is not None:
            query += " LIMIT ?"
            args.append(last_n)
        rows = self._connect().execute(query, args).fetchall()[::-1]
        return records_frame([
            PredictionRecord(ts=datetime.fromtimestamp(r[0], timezone.utc), request_id=r[1], image_sha256=r[2],
                             width=r[3], height=r[4], model_name=r[5], model_version=r[6], detections=r[7],
                             image_path=r[8], traffic=r[9], statistics=json.loads(r[10]), summary={},
                             embedding=np.frombuffer(r[11], dtype=np.float32))
            for r in rows])

    def purge_older_than(self, age: timedelta) -> int:
        """See `PredictionStore.purge_older_than`."""
        cutoff = (datetime.now(timezone.utc) - age).timestamp()
        return self._delete("ts < ?", (cutoff,))

    def delete_image(self, sha256: str) -> int:
        """See `PredictionStore.delete_image`. The image file goes even when no record names it."""
        _check_sha256(sha256)  # it names a file: nothing but a digest may reach the path
        n = self._delete("image_sha256 = ?", (sha256,))
        (self.image_dir / f"{sha256}.png").unlink(missing_ok=True)
        return n

    def delete_tenant(self, tenant: str, older_than: timedelta | None = None) -> int:
        """See `PredictionStore.delete_tenant`."""
        if older_than is None:
            return self._delete("tenant = ?", (tenant,))
        return self._delete("tenant = ? AND ts < ?", (tenant, (datetime.now(timezone.utc) - older_than).timestamp()))

    def tenants(self) -> list[str]:
        """Every tenant with records."""
        return [r[0] for r in self._connect().execute("SELECT DISTINCT tenant FROM predictions")]

    def tenant_count(self, tenant: str) -> int:
        """How many records `tenant` has (tests, `detops purge` reports)."""
        return self._connect().execute("SELECT COUNT(*) FROM predictions WHERE tenant = ?", (tenant,)).fetchone()[0]

    def _delete(self, where: str, args: tuple) -> int:
        con = self._connect()
        with con:
            con.execute("BEGIN IMMEDIATE")
            shas = {r[0] for r in con.execute(f"SELECT image_sha256 FROM predictions WHERE {where}", args)}
            n = con.execute(f"DELETE FROM predictions WHERE {where}", args).rowcount
            # A kept image goes only when no remaining record still refers to it.
            still = {r[0] for r in con.execute(
                f"SELECT DISTINCT image_sha256 FROM predictions WHERE image_sha256 IN "
                f"({','.join('?' * len(shas))})", tuple(shas))} if shas else set()
        for sha in shas - still:
            (self.image_dir / f"{sha}.png").unlink(missing_ok=True)
        return n

    def save_image(self, sha256: str, rgb: np.ndarray) -> str:
        """See `PredictionStore.save_image` (PNG: annotators see the exact pixels the model saw)."""
        import cv2

        _check_sha256(sha256)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{sha256}.png"
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp.png")
            if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {tmp}")
            tmp.replace(path)  # atomic: a reader never sees half an image
        return str(path)


def _check_sha256(sha256: str) -> None:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise DetopsError(f"not a sha256 hex digest: {sha256!r}")


def records_frame(records: list[PredictionRecord]) -> pd.DataFrame:
    """Records as the flat frame `PredictionStore.read` returns (also used for the reference profile)."""
    import pandas as pd

    base = pd.DataFrame([[getattr(r, c) for c in BASE_COLUMNS] for r in records], columns=BASE_COLUMNS)
    base["ts"] = pd.to_datetime(base["ts"], utc=True)
    features = pd.DataFrame([{**r.statistics, **r.summary, **r.extra} for r in records], index=base.index)
    # width and height are both statistics and base columns: keep one copy.
    features = features.drop(columns=[c for c in BASE_COLUMNS if c in features.columns])
    emb = np.stack([np.asarray(r.embedding, dtype=np.float32) for r in records]) if records else np.empty((0, 0))
    embedding = pd.DataFrame(emb, columns=[f"{EMBEDDING_PREFIX}{i}" for i in range(emb.shape[1])], index=base.index)
    return pd.concat([base, features, embedding], axis=1)


def open_store(location: str | Path) -> PredictionStore:
    """The store at `location`: a folder -> `SQLiteStore` (its `predictions.db` and `images/`)."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        raise DetopsError(f"{text}: no PostgreSQL prediction store in this install; use a folder "
                          "(SQLite), or implement monitoring.store.PredictionStore over psycopg")
    if "://" in text:
        raise DetopsError(f"{text}: unsupported prediction store location (expected a folder)")
    return SQLiteStore(Path(text))


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m` (also `45s`, `2w`) -> timedelta; anything else is a DetopsError."""
    units = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        number = float(value)
        age = timedelta(**{units[unit]: number}) if unit in units and number >= 0 else None
        if age is not None:
            datetime.now(timezone.utc) - age  # an age reaching before year 1 cannot be a cutoff
    except (ValueError, OverflowError, KeyError):
        age = None
    if age is None:
        raise DetopsError(f"age {text!r}: expected a non-negative number and a unit among w, d, h, m, s "
                          "(e.g. 30d, 12h, 90m)")
    return age
