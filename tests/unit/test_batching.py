"""The in-process adaptive batcher, with a numpy `infer` that tags rows so every caller can check it
got its own rows back."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import InferenceBatcher, InferenceFailed, Overloaded


def _slow_identity(batch: np.ndarray) -> np.ndarray:
    time.sleep(0.02)  # long enough for concurrent submissions to queue behind the running batch
    return batch * 10


async def _submit_all(batcher: InferenceBatcher, parts: list[np.ndarray]) -> list[np.ndarray]:
    return await asyncio.gather(*(batcher(p) for p in parts))


def test_concurrent_submissions_share_batches_and_get_their_own_rows() -> None:
    sizes: list[int] = []
    batcher = InferenceBatcher(_slow_identity, max_batch_size=8, max_latency_ms=5000, on_batch=sizes.append)
    parts = [np.full((1, 2), i, dtype=np.int64) for i in range(16)]
    results = asyncio.run(_submit_all(batcher, parts))
    for i, out in enumerate(results):
        assert out.shape == (1, 2) and (out == i * 10).all()
    assert sum(sizes) == 16 and max(sizes) > 1 and max(sizes) <= 8


def test_a_submission_larger_than_the_batch_limit_is_split() -> None:
    sizes: list[int] = []
    batcher = InferenceBatcher(_slow_identity, max_batch_size=4, max_latency_ms=5000, on_batch=sizes.append)
    rows = np.arange(10).reshape(10, 1)
    [out] = asyncio.run(_submit_all(batcher, [rows]))
    assert (out == rows * 10).all() and max(sizes) <= 4 and sum(sizes) == 10


def test_an_inference_error_reaches_every_caller_of_the_batch() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("onnx exploded")

    batcher = InferenceBatcher(broken, max_batch_size=4, max_latency_ms=5000)

    async def run() -> list[BaseException | np.ndarray]:
        return await asyncio.gather(*(batcher(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)

    errors = asyncio.run(run())
    assert all(isinstance(e, InferenceFailed) and "RuntimeError: onnx exploded" in str(e) for e in errors)


def test_a_full_queue_is_refused_as_overload() -> None:
    batcher = InferenceBatcher(_slow_identity, max_batch_size=2, max_latency_ms=5000, max_queued_images=3)

    async def run() -> list[BaseException | np.ndarray]:
        return await asyncio.gather(*(batcher(np.zeros((1, 1))) for _ in range(6)), return_exceptions=True)

    outcomes = asyncio.run(run())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert refused and len(refused) < 6
    assert "already waiting" in str(refused[0])


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        InferenceBatcher(_slow_identity, max_batch_size=0, max_latency_ms=10)


def test_a_lone_submission_runs_at_once_and_the_queue_forms_the_next_batch() -> None:
    """Batches fill without waiting: an idle batcher runs the first submission alone (no corking
    delay, even with a long max_latency_ms); what arrives while it runs is the next batch, whole."""
    sizes: list[int] = []
    batcher = InferenceBatcher(_slow_identity, max_batch_size=8, max_latency_ms=5000, on_batch=sizes.append)

    async def run() -> float:
        started = time.perf_counter()
        first = asyncio.ensure_future(batcher(np.zeros((1, 1))))
        await asyncio.sleep(0.005)  # the first batch is running now (20 ms)
        await _submit_all(batcher, [np.zeros((1, 1))] * 6)
        await first
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    assert sizes == [1, 6] and elapsed < 1.0  # a corking batcher would hold the first for company


def test_then_runs_in_the_inference_thread_on_the_callers_rows_and_its_error_is_the_callers_own() -> None:
    threads: set[str] = set()

    def then(rows: np.ndarray) -> int:
        threads.add(threading.current_thread().name)
        if (rows == 20).all():
            raise KeyError("postprocess of submission 2")
        return int(rows.sum())

    batcher = InferenceBatcher(_slow_identity, max_batch_size=8, max_latency_ms=5000)

    async def run() -> list[BaseException | int]:
        return await asyncio.gather(*(batcher(np.full((2, 1), i), then=then) for i in range(4)),
                                    return_exceptions=True)

    outcomes = asyncio.run(run())
    assert outcomes[0] == 0 and outcomes[1] == 20 and outcomes[3] == 60
    assert isinstance(outcomes[2], KeyError)  # only its own caller sees it
    assert threads and all(name.startswith("detops-inference") for name in threads)


def test_a_submission_that_cannot_start_within_max_latency_is_refused() -> None:
    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.3)
        return batch

    batcher = InferenceBatcher(slow, max_batch_size=1, max_latency_ms=100)

    async def run() -> list[BaseException | np.ndarray]:
        return await asyncio.gather(*(batcher(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)

    first, *late = asyncio.run(run())
    assert isinstance(first, np.ndarray)
    assert all(isinstance(o, Overloaded) and "could not start within" in str(o) for o in late)


def test_a_dead_inference_thread_fails_the_callers_instead_of_leaving_them_waiting() -> None:
    batcher = InferenceBatcher(_slow_identity, max_batch_size=4, max_latency_ms=5000)
    batcher._thread.shutdown()  # what a broken executor looks like to the dispatcher

    async def run() -> list[BaseException | np.ndarray]:
        return await asyncio.wait_for(asyncio.gather(*(batcher(np.zeros((1, 1))) for _ in range(3)),
                                                     return_exceptions=True), timeout=5)

    outcomes = asyncio.run(run())
    assert all(isinstance(o, InferenceFailed) for o in outcomes), outcomes
