"""A circuit breaker around inference, one per worker.

`failures` consecutive failed inferences open it: for `reset_s` every detection request answers
503 `circuit_open` at once (with Retry-After) instead of queueing on a model that fails, and /readyz
answers 503 so Kubernetes and the deployment's front door take the instance out. After `reset_s`
one request is let through (half-open): a success closes the circuit, a failure opens it again for
another `reset_s`. So it closes by itself once the model works again. A small class of our own rather
than pybreaker: the calls are async and the state must also drive /readyz.
"""

from __future__ import annotations

import math
import threading
import time

from serving.imaging import RequestRejected

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """See the module docstring."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures_to_open = failures
        self.reset_s = reset_s
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return CLOSED
            return HALF_OPEN if time.monotonic() - self._opened_at >= self.reset_s else OPEN

    def before(self) -> None:
        """Call before an inference: raises 503 `circuit_open` while open (one trial when half-open)."""
        with self._lock:
            if self._opened_at is None:
                return
            waited = time.monotonic() - self._opened_at
            if waited >= self.reset_s and not self._trial:
                self._trial = True  # this request is the trial
                return
            retry = max(1, math.ceil(self.reset_s - waited))
        raise RequestRejected("circuit_open", f"inference failed {self.failures_to_open} times in a row; "
                              f"this instance refuses detection for {retry} s (gateway.breaker_reset_s)",
                              503, retry_after=retry)

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.failures_to_open:
                self._opened_at = time.monotonic()
            self._trial = False
