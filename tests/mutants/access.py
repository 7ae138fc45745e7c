"""Access mutants: the gateway's guarantees (serving/gateway/) broken one at a time, as before issue 18.

- `key_cache_without_grace`: while the key database is down, a cached key keeps its last answer for
  the whole outage (no `gateway.key_outage_grace_s` bound);
- `forwarded_for_from_any_peer`: the client's address read from `X-Forwarded-For` whoever sent it,
  so a client on the network names itself 127.0.0.1;
- `rate_limits_fail_open_silently`: an unreachable limits storage lets requests through with a log
  line only (nothing in /metrics, nothing in /readyz);
- `auth_off_exposure_unchecked`: authentication off is not refused on a network address (the bind
  address of a service worker, deploy.host of the front door).

Expected to fail with them: the checks of tests/unit/test_gateway.py named after each guarantee
(`check_cached_key_stops_after_ttl_plus_grace`, `check_forwarded_for_is_believed_from_the_front_door_only`,
`check_rate_limits_failing_open_are_counted_and_named`, `check_auth_off_is_refused_on_a_network_address`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from serving.gateway import keys, limits, network
from serving.jobs.store import StoreUnavailable


@contextmanager
def key_cache_without_grace() -> Iterator[None]:
    """`KeyCache.lookup` answering a known key from the cache for as long as the database is down."""

    def lookup(self: keys.KeyCache, key: str) -> keys.ApiKey | None:
        digest = keys.hash_key(key, self.keys.pepper)
        cached = self._entries.get(digest)
        if cached is not None and cached[1] > keys.time.monotonic():
            return cached[0]
        try:
            found = self.keys.lookup(key)
        except StoreUnavailable:
            if cached is not None and cached[0] is not None:
                return cached[0]
            raise
        self._entries[digest] = (found, keys.time.monotonic() + self.ttl_s)
        return found

    with mock.patch.object(keys.KeyCache, "lookup", lookup):
        yield


@contextmanager
def forwarded_for_from_any_peer() -> Iterator[None]:
    """`network.client_address` without its first question (is the TCP peer a trusted proxy?): the
    right-most untrusted `X-Forwarded-For` hop, whoever sent the header."""

    def client_address(scope: dict, trusted: list) -> str:
        hops = [h.strip() for k, v in scope.get("headers", ()) if k.lower() == b"x-forwarded-for"
                for h in v.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not network._trusted(hop, trusted):
                return hop
        return hops[0] if hops else (scope.get("client") or ("",))[0]

    with mock.patch.object(network, "client_address", client_address):
        yield


@contextmanager
def rate_limits_fail_open_silently() -> Iterator[None]:
    """`Limits._hit` as before: a storage error is a warning in the log, nothing else."""

    def hit(self: limits.Limits, item: object, ident: str, cost: int, code: str, what: str) -> None:
        try:
            if self.limiter.hit(item, ident, cost=cost):  # type: ignore[arg-type]
                return
            reset = self.limiter.get_window_stats(item, ident).reset_time  # type: ignore[arg-type]
        except Exception:
            limits.log.warning("rate-limit storage %s unavailable: %s not enforced", self.storage_url, what)
            return
        retry = max(1, int(reset - time.time()) + 1)
        raise limits.RequestRejected(code, f"{what}; retry after {retry} s", 429, retry_after=retry)

    with mock.patch.object(limits.Limits, "_hit", hit):
        yield


@contextmanager
def auth_off_exposure_unchecked() -> Iterator[None]:
    """Authentication off accepted whatever address the service or the front door listens on."""
    with mock.patch.object(network, "refuse_auth_off_exposed", lambda cfg, addresses, where: None):
        yield
