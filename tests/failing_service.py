"""The product's Detector, served with a runtime whose inference fails while a file exists: how the
circuit breaker's test makes inference fail with no switch in the product.

`bentoml serve tests.failing_service:Detector` (from the repository root) with
DETOPS_TEST_INFERENCE_FAULT_FILE=<path>: every BentoML worker imports this module, which wraps
`ModelRuntime.infer` before the service's workers load their model; while <path> exists each
inference raises, as a broken model or runtime would.
"""

from __future__ import annotations

import os
from typing import Any

from serving.runtime import ModelRuntime
from serving.service import Detector

__all__ = ["Detector"]

FAULT_FILE = os.environ["DETOPS_TEST_INFERENCE_FAULT_FILE"]
_infer = ModelRuntime.infer


def _infer_unless_faulted(self: ModelRuntime, *args: Any, **kwargs: Any) -> Any:
    if os.path.exists(FAULT_FILE):
        raise RuntimeError(f"inference fault injected by the test ({FAULT_FILE} exists)")
    return _infer(self, *args, **kwargs)


ModelRuntime.infer = _infer_unless_faulted  # type: ignore[method-assign]
