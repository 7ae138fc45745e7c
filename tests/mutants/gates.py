"""Gate mutants: the promotion gates deciding on the point estimate of a mAP delta instead of the lower
end of its paired-bootstrap interval (the guarantee: a loss the test images cannot rule out counts).

- `no_regression_on_point_estimate`: `check_gates` (register and the monitoring loop) judges
  `no_regression` on the delta, as it did before issue 18;
- `int8_gate_on_point_estimate`: the variant gate (evaluation/quantize.py) reads the delta where the
  interval's lower end belongs.

Expected to fail with them: tests/unit/test_gates.py (register's `no_regression`, the loop's gates) and
tests/unit/test_quantize.py (the int8 gate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import evaluation.coco
import evaluation.gates
import evaluation.register


@contextmanager
def no_regression_on_point_estimate() -> Iterator[None]:
    """`check_gates` with the base comparison's lower end replaced by its point delta."""
    real = evaluation.gates.check_gates

    def mutant(metrics, gates, comparison, slices=None):  # noqa: ANN001, ANN202 - the product's signature
        if comparison is not None:
            comparison = dataclasses.replace(comparison, ci_low=comparison.delta)
        return real(metrics, gates, comparison, slices)

    # register binds the name at import: both places, so that every caller gets the mutant.
    with mock.patch.object(evaluation.gates, "check_gates", mutant), \
            mock.patch.object(evaluation.register, "check_gates", mutant):
        yield


@contextmanager
def int8_gate_on_point_estimate() -> Iterator[None]:
    """The paired bootstrap, as the variant gate imports it, answering the point delta as its lower end."""
    real = evaluation.coco.bootstrap_map_delta

    def mutant(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        delta, _, high = real(*args, **kwargs)
        return delta, delta, high

    with mock.patch.object(evaluation.coco, "bootstrap_map_delta", mutant):
        yield
