"""In-process result cache: bounded LRU of detections keyed by what determines them (the image bytes'
SHA-256, the model version and the request's post-processing parameters) and by the tenant that asked:
entries are never shared across tenants (a hit's timing would tell tenant B that A sent that image). Thread-safe, so the
threads BentoML runs synchronous code in can share one."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from serving.runtime import PredictParams

V = TypeVar("V")


def cache_key(sha256: str, model_version: str, params: PredictParams, tenant: str = "-") -> tuple[Hashable, ...]:
    """The key of one prediction for one tenant. `params` must be the effective ones (`ModelRuntime.resolve`: card
    defaults filled in, classes sorted), so that a request spelling out a default and one omitting
    it share an entry."""
    return (tenant, sha256, model_version, params)


class ResultCache(Generic[V]):
    """A least-recently-used map of at most `max_entries` values; 0 disables it."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 (got {max_entries})")
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value for `key` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        """Store `value`, evicting the least recently used entries beyond the bound."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

