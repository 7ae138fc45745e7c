"""`detops simulate`: send synthetic traffic (in-distribution or shifted) to a running detection
service, bounded in count and time and rate-limited."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from pipelines.config.data import ShiftName, SynthesizeConfig
from pipelines.errors import DetopsError
from serving.client import auth_headers


@dataclass
class SimulationResult:
    """What was sent: status codes (`error` for transport failures), count and duration."""

    status_codes: Counter
    sent: int
    seconds: float


def simulate(url: str, n: int, *, shift: ShiftName | None = None, rate: float = 5.0, seed: int = 1000,
             timeout_s: float = 300.0, synth: SynthesizeConfig | None = None) -> SimulationResult:
    """POST `n` synthetic JPEG images to `<url>/detect` (multipart field `image`) at most `rate` per
    second, stopping after `timeout_s`. `synth` sets the generator (classes, sizes); its seed and
    shift are replaced by `seed` and `shift`, so a different seed than training gives fresh
    in-distribution images."""
    import httpx
    from rich.progress import Progress

    from labeling.synthetic import jpeg_bytes, render

    if n < 1:
        raise DetopsError(f"simulate: --n must be >= 1 (got {n})")
    if rate <= 0:
        raise DetopsError(f"simulate: --rate must be > 0 (got {rate})")
    if not url.startswith(("http://", "https://")):
        raise DetopsError(f"simulate: --url must be an http(s) URL (got {url!r})")
    cfg = (synth or SynthesizeConfig()).model_copy(update={"n_images": n, "seed": seed, "shift": shift,
                                                           "messy": False})
    endpoint = url.rstrip("/") + "/detect"
    codes: Counter = Counter()
    start = time.monotonic()
    with httpx.Client(timeout=30.0, headers=auth_headers()) as client, Progress(transient=True) as progress:
        job = progress.add_task(f"POST {endpoint} ({shift or 'in-distribution'})", total=n)
        for i in range(n):
            if time.monotonic() - start > timeout_s:
                break
            sample = render(cfg, i)
            try:
                response = client.post(endpoint, files={"image": (sample.name, jpeg_bytes(sample), "image/jpeg")})
                codes[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                codes[f"error:{type(exc).__name__}"] += 1
            progress.advance(job)
            # Rate limit: request i+1 may not start before start + (i+1)/rate.
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return SimulationResult(codes, sum(codes.values()), time.monotonic() - start)
