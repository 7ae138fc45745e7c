"""serving/cache.py: keys, LRU bound, disabled cache, thread safety."""

from __future__ import annotations

import threading

import pytest

from serving.cache import ResultCache, cache_key
from serving.runtime import PredictParams


def key(sha: str = "abc", version: str = "1", **params: object) -> tuple:
    defaults = {"conf": 0.25, "iou": 0.45, "max_det": 300, "classes": None}
    return cache_key(sha, version, PredictParams(**{**defaults, **params}))


def test_key_depends_on_image_model_and_parameters() -> None:
    base = key()
    assert key() == base
    assert key(sha="abd") != base
    assert key(version="2") != base
    assert key(conf=0.5) != base
    assert key(iou=0.7) != base
    assert key(max_det=10) != base
    assert key(classes=(1,)) != base


def test_lru_evicts_least_recently_used() -> None:
    cache: ResultCache[str] = ResultCache(2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C")
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c"), len(cache)) == ("A", "C", 2)


def test_zero_entries_disables_and_negative_is_refused() -> None:
    cache: ResultCache[str] = ResultCache(0)
    cache.put("a", "A")
    assert cache.get("a") is None and len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        ResultCache(-1)


def test_concurrent_use_keeps_the_bound() -> None:
    cache: ResultCache[int] = ResultCache(50)

    def work(offset: int) -> None:
        for i in range(2000):
            cache.put((offset, i % 97), i)
            cache.get((offset, (i * 7) % 97))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50
