"""Which model version the job workers run, and the runtimes they keep loaded.

`live_model()` is the one place that decides the version a worker loads for a new job: a version
pinned with DETOPS_WORKER_MODEL_VERSION (Kubernetes pins it per revision), else the version the
project's blue/green deployment serves (`detops deploy`, its state in deploy.state_dir), else the
registry's `serve.model_name@serve.alias` (champion) when nothing is deployed. A job is pinned to the
version that was live when its first chunk was claimed, so a rollout changes the version of the jobs
that start after it while the running ones finish on theirs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pipelines.environment import cache_dir
from serving.runtime import ModelRuntime
from serving.schemas import ModelInfo
from serving.settings import load_serve_config

PINNED_VERSION_ENV = "DETOPS_WORKER_MODEL_VERSION"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A registry version: name, version and the alias it was found through (None: pinned)."""

    name: str
    version: str
    alias: str | None = None


def live_model() -> ModelRef:
    """The registry version new jobs run on (see the module docstring). Raises RegistryError when
    it does not exist."""
    from deploy.state import live_version
    from pipelines import registry
    from pipelines.config.base import load_section
    from pipelines.config.deploy import DeployConfig

    cfg = load_serve_config()
    pinned = os.environ.get(PINNED_VERSION_ENV) or live_version(load_section(DeployConfig).state_dir)
    if pinned:
        return ModelRef(cfg.model_name, str(registry.resolve(cfg.model_name, version=pinned).version))
    return ModelRef(cfg.model_name, str(registry.resolve(cfg.model_name, alias=cfg.alias).version), cfg.alias)


class LiveModel:
    """`live_model()` asked at most every `interval_s`; the last answer is kept while the registry
    cannot be reached."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._ref: ModelRef | None = None
        self._checked = 0.0

    def get(self) -> ModelRef:
        if self._ref is None or time.monotonic() - self._checked >= self.interval_s:
            try:
                ref = live_model()
            except Exception:
                if self._ref is None:
                    raise
                log.warning("cannot ask the registry which version is live; keeping v%s", self._ref.version,
                            exc_info=True)
            else:
                if self._ref is not None and ref != self._ref:
                    log.info("live model version changed: v%s -> v%s (new jobs only)", self._ref.version, ref.version)
                self._ref = ref
            self._checked = time.monotonic()
        return self._ref


class Runtimes:
    """Model runtimes by registry version, the `keep` most recently used loaded; each version's
    folder is downloaded once into `folder` (default .cache/jobs-models)."""

    def __init__(self, *, threads: int, keep: int = 2, folder: Path | None = None) -> None:
        self.threads = threads
        self.keep = keep
        self.folder = folder
        self._loaded: OrderedDict[tuple[str, str], tuple[ModelRuntime, ModelInfo]] = OrderedDict()

    def get(self, name: str, version: str) -> tuple[ModelRuntime, ModelInfo]:
        """The runtime of `name` version `version` and the model info its results carry."""
        key = (name, version)
        if key not in self._loaded:
            runtime = ModelRuntime.load(model_folder(name, version, self.folder), threads=self.threads)
            self._loaded[key] = (runtime, ModelInfo(name=name, version=version, alias=None))
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]


def model_folder(name: str, version: str, folder: Path | None = None) -> Path:
    """The model folder of registry version `version` of `name`, downloaded once under `folder`
    (default .cache/jobs-models/<registry>/<name>/<version>, <registry> a digest of the tracking URI:
    version 1 of two registries are two models)."""
    import hashlib

    from pipelines import registry
    from pipelines.tracking import tracking_uri
    from serving.runtime import MODEL_FILE

    store = hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]
    target = (folder or cache_dir() / "jobs-models") / store / name / version
    if not (target / MODEL_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            staged = registry.download_model_dir(name, version, Path(tmp))
            try:
                os.replace(staged, target)  # atomic: another process may be downloading it too
            except OSError:
                if not (target / MODEL_FILE).is_file():
                    shutil.rmtree(target, ignore_errors=True)
                    os.replace(staged, target)
    return target
