"""The BentoML service for tests and benchmarks, and the synthetic traffic images sent to it.

Shared by the service tests, the load test (tests/load/run.py), the serving benchmark
(tests/bench/serving_bench.py) and their integration tests. `detector_service` is the whole recipe: import
a local model folder with `detops build --model-dir --no-bento` into a private BENTOML_HOME, then
`bentoml serve serving.service:Detector` on 127.0.0.1 with a private prediction log, started and stopped
by the project's process supervisor (pipelines/processes.py), so a run never touches the user's model
store or monitoring data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pipelines.errors import DetopsError
from pipelines.processes import HOST, Server, free_port, running

ROOT = Path(__file__).resolve().parents[1]
TEST_PEPPER = "tests-only-pepper-0123456789"  # a test service's keys; never used outside tests


def synthetic_jpegs(n: int) -> list[bytes]:
    """`n` distinct JPEG images drawn like the pipeline's synthetic project (params.yaml `synthesize:`
    sizes and classes), encoded as `synthesize` writes them; rendered in memory, nothing written."""
    from labeling.synthetic import jpeg_bytes, render
    from pipelines.config.base import load_section
    from pipelines.config.data import SynthesizeConfig

    cfg = load_section(SynthesizeConfig, n_images=n)
    return [jpeg_bytes(render(cfg, index)) for index in range(n)]


def service_env(workdir: Path, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a private service: BentoML store and prediction log under `workdir`, a test
    pepper for its keys, authentication off (loopback only) unless `overrides` turn it on
    (DETOPS_GATEWAY_AUTH=true), plus DETOPS_* `overrides` (serving/settings.py)."""
    return {**os.environ, "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
            "DETOPS_SERVE_PREDICTION_LOG": str(workdir / "predictions"), "DETOPS_KEY_PEPPER": TEST_PEPPER,
            "DETOPS_GATEWAY_AUTH": "false", **(overrides or {})}


def auth_overrides(workdir: Path) -> dict[str, str]:
    """Overrides that turn authentication on for a private service, its keys in a private job store."""
    return {"DETOPS_GATEWAY_AUTH": "true", "DETOPS_DATABASE_URL": f"sqlite:///{workdir / 'jobs.db'}"}


# Benchmarks and load tests measure capacity: the per-key rates and the daily quota must not be what they hit.
BENCH_OVERRIDES = {"DETOPS_GATEWAY_REQUESTS_PER_S": "1000000", "DETOPS_GATEWAY_IMAGES_PER_S": "1000000",
                   "DETOPS_GATEWAY_IMAGES_PER_DAY": "1000000000"}


def mint_key(env: Mapping[str, str], tenant: str = "tests", scopes: str = "detect,jobs:write,jobs:read") -> str:
    """A new API key in the job store of `env` (DETOPS_DATABASE_URL, DETOPS_KEY_PEPPER), as
    `detops keys create` makes it; returns the key."""
    from serving.gateway.keys import KeyStore, pepper
    from serving.jobs.store import JobStore

    store = JobStore(env["DETOPS_DATABASE_URL"])
    try:
        store.create_schema()
        return KeyStore(store, pepper(env)).create(tenant, scopes, "tests")[1]
    finally:
        store.close()


def import_model(model_dir: Path, env: Mapping[str, str]) -> str:
    """`detops build --model-dir MODEL_DIR --no-bento` into env's BENTOML_HOME; returns its output."""
    built = subprocess.run([sys.executable, "-m", "pipelines.cli", "build", "--model-dir", str(model_dir),
                            "--no-bento"], cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=180,
                           check=False)
    if built.returncode != 0:
        raise DetopsError(f"detops build --model-dir {model_dir} failed:\n{built.stderr[-3000:]}")
    return built.stdout.strip()


@contextmanager
def detector_service(model_dir: Path, workdir: Path, *, overrides: Mapping[str, str] | None = None,
                     timeout_s: float = 180.0, service: str = "serving.service:Detector") -> Iterator[Server]:
    """The BentoML Detector serving `model_dir` on a free loopback port until the block ends; ready
    once /readyz answers (the service runs one real inference before it says so). `service` is what
    `bentoml serve` imports: the product's, or a test-side module serving it (tests/failing_service.py)."""
    env = service_env(workdir, overrides)
    import_model(model_dir, env)
    port = free_port()
    argv = [sys.executable, "-m", "bentoml", "serve", service, "--host", HOST, "--port", str(port)]
    with running(argv, url=f"http://{HOST}:{port}", ready_path="/readyz", env=env, cwd=ROOT,
                 log=workdir / "serve.log", timeout_s=timeout_s) as server:
        yield server
