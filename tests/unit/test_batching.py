"""The in-process adaptive batcher on BentoML's own dispatcher, with a numpy `infer` that tags rows
so every caller can check it got its own rows back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.batching import InferenceBatcher, InferenceFailed, Overloaded


def _slow_identity(batch: np.ndarray) -> np.ndarray:
    import time

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
