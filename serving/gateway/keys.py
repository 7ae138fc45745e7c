"""API keys: created for a tenant with scopes, stored only as a peppered hash in the jobs database.

A key looks like `dtk_<id>_<secret>`; the id (12 hex) names it in `detops keys list`/`revoke` and in
logs, the secret (32 random bytes) is shown once, by `detops keys create`. The table
`detops_api_keys` lives beside the job tables (serving/jobs/store.py: SQLite by default, PostgreSQL in
production) and holds HMAC-SHA256(pepper, key): a stolen database does not give usable keys, and
without the pepper (DETOPS_KEY_PEPPER, environment only) not even an offline guess can be checked.

`KeyCache` is what the service asks: a lookup is cached for `gateway.key_cache_ttl_s` (default 2 s),
so a revocation reaches every worker of every colour within that time, whatever process revoked it.
When the database cannot be reached, a key seen before keeps working on its cached answer for
`gateway.key_outage_grace_s` (default 30 s, at most 60) past that answer's TTL, so /detect survives a
short job-store outage; after that, and for an unseen key at once, the answer is 503, never a guess.
So a key revoked just before an outage works for at most TTL + grace, not for the whole outage.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Column, DateTime, Index, String, Table, Text, select, update

from pipelines.errors import DetopsError
from serving.gateway.scopes import parse_scopes
from serving.jobs.store import JobStore, StoreUnavailable, metadata, utcnow

PEPPER_ENV = "DETOPS_KEY_PEPPER"
KEY_RE = re.compile(r"^dtk_([0-9a-f]{12})_[A-Za-z0-9_-]{20,100}$")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")

api_keys = Table(
    "detops_api_keys", metadata,
    Column("key_id", String(12), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("scopes", Text, nullable=False),  # comma-separated
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("name", String(255)),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime),
    Index("ix_detops_api_keys_tenant", "tenant"),
)


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never its secret)."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


def pepper(environ: Mapping[str, str] | None = None) -> bytes:
    """The keys' pepper from DETOPS_KEY_PEPPER (at least 16 characters); a DetopsError otherwise."""
    value = (os.environ if environ is None else environ).get(PEPPER_ENV, "")
    if len(value) < 16:
        raise DetopsError(f"{PEPPER_ENV} must be set to a secret of at least 16 characters (keys are stored as "
                          f"HMAC-SHA256(pepper, key)); e.g. export {PEPPER_ENV}=$(openssl rand -hex 32)")
    return value.encode()


def hash_key(key: str, pepper_bytes: bytes) -> str:
    """HMAC-SHA256(pepper, key) as hex: what the table stores and looks up."""
    return hmac.new(pepper_bytes, key.encode(), hashlib.sha256).hexdigest()


def key_id_of(key: str) -> str | None:
    """The public id inside a well-formed key (for logs), else None."""
    m = KEY_RE.match(key)
    return m.group(1) if m else None


def _record(row: object) -> ApiKey:
    m = row._mapping  # type: ignore[attr-defined]
    return ApiKey(key_id=m["key_id"], tenant=m["tenant"], scopes=frozenset(m["scopes"].split(",")), name=m["name"],
                  created_at=m["created_at"], revoked_at=m["revoked_at"])


class KeyStore:
    """The keys table on the jobs database (see the module docstring)."""

    def __init__(self, store: JobStore, pepper_bytes: bytes) -> None:
        self.store = store
        self.pepper = pepper_bytes
        self._schema_ready = False

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            with self.store._write() as conn:
                api_keys.create(conn, checkfirst=True)
            self._schema_ready = True

    def create(self, tenant: str, scopes: str, name: str | None = None) -> tuple[ApiKey, str]:
        """A new key for `tenant` with `scopes` (comma-separated); returns its record and the key itself,
        which is stored nowhere."""
        if not TENANT_RE.match(tenant):
            raise DetopsError(f"tenant {tenant!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-' "
                              "(starting with a letter or digit)")
        try:
            granted = parse_scopes(scopes)
        except ValueError as exc:
            raise DetopsError(str(exc)) from None
        self._ensure_schema()
        key_id = secrets.token_hex(6)
        key = f"dtk_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id=key_id, tenant=tenant, scopes=frozenset(granted), name=name, created_at=utcnow(),
                        revoked_at=None)
        with self.store._write() as conn:
            conn.execute(api_keys.insert().values(
                key_id=key_id, tenant=tenant, scopes=",".join(granted), key_hash=hash_key(key, self.pepper), name=name,
                created_at=record.created_at, revoked_at=None))
        return record, key

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (or one tenant's), oldest first."""
        self._ensure_schema()
        query = select(api_keys).order_by(api_keys.c.created_at)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with self.store._read() as conn:
            return [_record(r) for r in conn.execute(query)]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key by its id; a DetopsError when there is no such key."""
        self._ensure_schema()
        with self.store._write() as conn:
            conn.execute(update(api_keys).where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=utcnow()))
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            raise DetopsError(f"no key with id {key_id!r} (see `detops keys list`)")
        return _record(row)

    def lookup(self, key: str) -> ApiKey | None:
        """The live (not revoked) key for this secret, or None; StoreUnavailable when the database is down."""
        if key_id_of(key) is None:
            return None  # malformed: no database round trip
        self._ensure_schema()
        with self.store._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == hash_key(key, self.pepper),
                                                      api_keys.c.revoked_at.is_(None))).first()
        return _record(row) if row else None


def open_key_store() -> KeyStore:
    """The keys of the configured jobs database (DETOPS_DATABASE_URL, else jobs.data_dir's SQLite file)
    with the environment's pepper: what `detops keys` and the deployment's own smoke-check key use."""
    from serving.jobs.settings import load_jobs_settings

    settings = load_jobs_settings()
    store = JobStore(settings.database_url, connect_timeout_s=settings.config.db_connect_timeout_s)
    store.create_schema()
    return KeyStore(store, pepper())


class KeyCache:
    """`KeyStore.lookup` with a short TTL per key hash (see the module docstring); thread-safe."""

    def __init__(self, keys: KeyStore, ttl_s: float, grace_s: float) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self._entries: dict[str, tuple[ApiKey | None, float]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> tuple[bool, ApiKey | None]:
        """(True, the key's record or None) while its cached answer is within the TTL; (False, None)
        when only `lookup` can tell. No database: the gateway asks this first, in its event loop,
        and pays a thread for `lookup` only on a miss."""
        with self._lock:
            cached = self._entries.get(hash_key(key, self.keys.pepper))
        if cached is not None and cached[1] > time.monotonic():
            return True, cached[0]
        return False, None

    def lookup(self, key: str) -> ApiKey | None:
        """The key's record (None: unknown or revoked). Raises StoreUnavailable while the database is
        down for a key not seen before, or seen longer ago than its TTL plus the outage grace."""
        hit, found = self.cached(key)
        if hit:
            return found
        digest = hash_key(key, self.keys.pepper)
        now = time.monotonic()
        try:
            found = self.keys.lookup(key)
        except StoreUnavailable:
            with self._lock:
                cached = self._entries.get(digest)
            if cached is not None and cached[0] is not None and now < cached[1] + self.grace_s:
                return cached[0]  # the database is down: a known key keeps its last answer, for a while
            raise
        with self._lock:
            if len(self._entries) > 100_000:  # bounded: unknown keys from a scanner cannot grow it forever
                self._entries.clear()
            self._entries[digest] = (found, now + self.ttl_s)
        return found
