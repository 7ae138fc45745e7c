"""In-process adaptive batching of model inference, one batcher per service worker.

`InferenceBatcher` wraps BentoML's own adaptive-batching engine,
`bentoml._internal.marshal.dispatcher.CorkDispatcher` (the dispatcher behind
`@bentoml.api(batchable=True)`), but feeds it numpy arrays directly from the request handlers of the
same process: no HTTP hop, no serialization. Each caller submits its letterboxed uint8 images
`(n, S, S, 3)`; the dispatcher corks concurrent submissions into one batch of at most
`max_batch_size` images (a larger submission is split), learns how long a batch takes (its latency
optimizer) and drops a waiting submission whose batch could not start in time for `max_latency_ms`.
One batch runs at a time, in a worker thread (ONNX Runtime releases the GIL), so the event loop keeps
accepting and decoding requests meanwhile.

Errors: a submission dropped by the dispatcher, or refused because more than `max_queued_images`
are already waiting, raises `Overloaded`; anything the inference itself raises comes back to every
caller of that batch as `InferenceFailed` (logged once with its traceback).

Why not a `batchable=True` API called through `self.to_async`: in BentoML 1.4.39 that self-call is an
HTTP request to the worker's own app with a JSON body (pickle is refused in the main server), and
the JSON (de)serialization of the tensors cost ~65 % of the worker's CPU (docs/performance.md).
`CorkDispatcher` is internal BentoML API: pin bentoml and re-check this module when upgrading.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import NoReturn

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher

log = logging.getLogger(__name__)

QUEUED_BATCHES = 8  # default bound of waiting images: this many full batches


class Overloaded(Exception):
    """The worker cannot take this inference now (queue full, or it could not start in time)."""


class InferenceFailed(Exception):
    """The batched inference raised; the message names the original exception."""


class InferenceBatcher:
    """Adaptive batching of `infer` for the event loop it is first used in.

    `infer` takes the submissions stacked along axis 0 and returns one output row per input row; it
    is synchronous and runs in a worker thread. `on_batch(n)` is called with the size of every batch
    that ran. Create it anywhere; the dispatcher itself is created on the first call, inside the
    running event loop (its queue, condition and controller task belong to that loop).
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_latency_ms: int,
                 max_queued_images: int | None = None, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_latency_ms < 1:
            raise ValueError(f"max_batch_size and max_latency_ms must be >= 1 (got {max_batch_size}, "
                             f"{max_latency_ms})")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.max_queued_images = max_queued_images or QUEUED_BATCHES * max_batch_size
        self.on_batch = on_batch
        self.queued_images = 0  # submitted and not answered yet, the running batch included
        self._dispatcher: CorkDispatcher[np.ndarray, np.ndarray] | None = None
        self._submit: Callable[[np.ndarray], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """Inference on `images` (n >= 1 rows) as part of a batch; returns `infer`'s n output rows."""
        n = len(images)
        if self.queued_images and self.queued_images + n > self.max_queued_images:
            raise Overloaded(f"{self.queued_images} images are already waiting for inference in this worker "
                             f"(limit {self.max_queued_images}); retry later")
        submit = self._bind()
        self.queued_images += n
        try:
            return await submit(images)  # type: ignore[misc]
        finally:
            self.queued_images -= n

    def close(self) -> None:
        """Stop the dispatcher's controller and cancel what still waits (server shutdown)."""
        if self._dispatcher is not None:
            self._dispatcher.shutdown()
            self._dispatcher = self._submit = self._loop = None

    # ------------------------------------------------------------------ mechanics
    def _bind(self) -> Callable[[np.ndarray], object]:
        loop = asyncio.get_running_loop()
        if self._submit is None or self._loop is not loop:
            self.close()  # a dispatcher is tied to one loop
            self._dispatcher = CorkDispatcher(self.max_latency_ms, self.max_batch_size,
                                              fallback=self._dropped, get_batch_size=len, batch_dim=(0, 0))
            self._submit = self._dispatcher(self._run_batch)
            self._loop = loop
        return self._submit

    def _dropped(self) -> NoReturn:
        # CorkDispatcher cancels a waiting submission whose batch cannot meet max_latency_ms and then
        # answers it with this fallback.
        raise Overloaded(f"the inference could not start within serve.max_latency_ms "
                         f"({self.max_latency_ms} ms) in this worker; retry later")

    async def _run_batch(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(p) for p in parts]
        try:
            out = await asyncio.to_thread(self._infer_stacked, parts)
        except Exception as exc:
            log.exception("batched inference of %d images failed", sum(sizes))
            raise InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}") from exc
        if self.on_batch is not None:
            self.on_batch(sum(sizes))
        return np.split(out, np.cumsum(sizes)[:-1])

    def _infer_stacked(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = self.infer(batch)
        if len(out) != len(batch):
            raise ValueError(f"infer returned {len(out)} rows for a batch of {len(batch)}")
        return out
