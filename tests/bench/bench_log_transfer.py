"""How the prediction log should hand an image to its featurizer process: measured, per image.

    python -m tests.bench.bench_log_transfer [--images 200] [--side 640]

Three ways, each sending `--images` JPEGs (synthetic, `--side` px on the long side) from this process
to a 'spawn' child through a bounded multiprocessing queue, as `monitoring.logger` does:

- `array-pickle`: the decoded RGB array through the queue (pickled by the queue's feeder thread);
- `array-shm`: the array copied into a new `multiprocessing.shared_memory` block, its name through the
  queue; the child attaches, copies it out and unlinks the block;
- `encoded-bytes`: the JPEG bytes through the queue, decoded in the child (`serving.imaging.decode_rgb`).

Prints the sender's CPU per image (every thread of it: what the serving worker pays) and the child's
CPU per image until it holds the pixels (what the niced featurizer pays). CPU time, not wall time, so
the figure means something on a busy machine too; state the machine beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import time

import numpy as np

MAX = 1 << 28


def _receiver(items, results) -> None:  # noqa: ANN001
    from multiprocessing import shared_memory

    from serving.imaging import decode_rgb

    start = time.process_time()
    n = 0
    while (item := items.get()) is not None:
        kind, payload = item
        if kind == "array-pickle":
            pixels = payload
        elif kind == "array-shm":
            name, shape = payload
            block = shared_memory.SharedMemory(name=name)
            pixels = np.ndarray(shape, np.uint8, buffer=block.buf).copy()
            block.close()
            block.unlink()
        else:
            pixels = decode_rgb(payload, max_bytes=MAX, max_pixels=MAX)
        n += int(pixels.shape[2] == 3)
    results.put((n, time.process_time() - start))


def _jpegs(n: int, side: int) -> list[bytes]:
    from PIL import Image

    from tests.serving_process import synthetic_jpegs

    out = []
    for data in synthetic_jpegs(min(n, 16)):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def measure(kind: str, jpegs: list[bytes]) -> dict:
    """Send every image the `kind` way; the sender's and the receiver's CPU ms per image."""
    from multiprocessing import shared_memory

    from serving.imaging import decode_rgb

    ctx = multiprocessing.get_context("spawn")
    items, results = ctx.Queue(maxsize=64), ctx.Queue()
    child = ctx.Process(target=_receiver, args=(items, results))
    child.start()
    pixels = [decode_rgb(d, max_bytes=MAX, max_pixels=MAX) for d in jpegs]  # decoded by the request path
    start = time.process_time()
    for data, rgb in zip(jpegs, pixels):
        if kind == "array-pickle":
            items.put((kind, rgb))
        elif kind == "array-shm":
            block = shared_memory.SharedMemory(create=True, size=rgb.nbytes)
            np.ndarray(rgb.shape, np.uint8, buffer=block.buf)[:] = rgb
            items.put((kind, (block.name, rgb.shape)))
            block.close()
        else:
            items.put((kind, data))
    items.put(None)
    received, child_cpu = results.get(timeout=600)
    sender_cpu = time.process_time() - start  # includes the queue's feeder thread
    child.join(30)
    return {"kind": kind, "images": received, "sender_cpu_ms": round(1000 * sender_cpu / len(jpegs), 3),
            "receiver_cpu_ms": round(1000 * child_cpu / len(jpegs), 3)}


def main(argv: list[str] | None = None) -> int:
    """Run the three ways, print one JSON line each."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_log_transfer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=640)
    args = parser.parse_args(argv)
    jpegs = _jpegs(args.images, args.side)
    print(json.dumps({"side": args.side, "mean_jpeg_bytes": round(sum(map(len, jpegs)) / len(jpegs))}))
    for kind in ("array-pickle", "array-shm", "encoded-bytes"):
        print(json.dumps(measure(kind, jpegs)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
