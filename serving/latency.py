"""Single-request latency through the service's own path, in process: what the variant gate compares.

The engine alone (`runtime.predict` with ONNX Runtime's default threads, evaluation's
`latency_ms_batch1`) is not what a client waits for: the service decodes in a request thread,
letterboxes, hands the pixels to its batcher, infers with `serve.threads` ONNX Runtime threads (by
default the cores shared among the workers) and post-processes in the inference thread. At 160 px
those steps are most of a request, so a variant that is faster in the engine may not be faster
served. This runs the same steps, with the same functions, on real uploads: no HTTP, no prediction
log, one request at a time.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.batching import InferenceBatcher
from serving.imaging import decode_image
from serving.runtime import LetterboxMeta, ModelRuntime


def single_request_ms(model_dir: Path, uploads: Sequence[bytes], *, threads: int, repeats: int,
                      max_upload_bytes: int, max_pixels: int) -> float:
    """Median milliseconds of one request (decode -> letterbox -> batcher -> infer -> postprocess at
    the model card's thresholds) over `repeats` requests cycling through `uploads` (encoded images),
    after one warm-up request."""
    runtime = ModelRuntime.load(model_dir, threads=threads)
    params = runtime.resolve()

    def prepare(data: bytes) -> tuple[np.ndarray, list[LetterboxMeta]]:  # the service's _prepare, in a thread
        return runtime.letterbox([decode_image(data, max_bytes=max_upload_bytes, max_pixels=max_pixels).rgb])

    async def one(data: bytes) -> None:
        batch, metas = await asyncio.to_thread(prepare, data)
        await batcher(batch, then=functools.partial(runtime.postprocess, metas=metas, params=params))

    async def run() -> float:
        await one(uploads[0])
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            await one(uploads[i % len(uploads)])
            times.append((time.perf_counter() - start) * 1000)
        batcher.close()
        return statistics.median(times)

    batcher = InferenceBatcher(lambda batch: runtime.infer(runtime.to_input(batch)), max_batch_size=1,
                               max_latency_ms=60_000)
    return asyncio.run(run())
