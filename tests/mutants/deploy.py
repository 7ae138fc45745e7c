"""Deployment mutants: the guarantees that a refused version never stays `@champion`, and that the smoke
check holds a version to its thresholds (IoU >= `deploy.smoke_iou`, |Δ confidence| <=
`deploy.smoke_conf_tolerance`).

- `leave_refused_champion`: the refusal policy (deploy/policy.py) tags the version but leaves the alias
  on it, the watchers' behaviour before issue 18 ("left alone"); used by both watchers and the rollout.
- `smoke_iou_loose`: the smoke comparison reads the IoU threshold as 0.9;
- `smoke_ignores_confidence`: the smoke comparison lets any confidence through.

Expected to fail with them: the alias check of tests/integration/test_deploy.py (a re-promoted refused
version) and tests/integration/test_k8s_watch.py (an aborted revision); the threshold ± ε check of
tests/unit/test_deploy.py (each smoke mutant).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import deploy.policy
import deploy.verify
from pipelines import registry


@contextmanager
def leave_refused_champion() -> Iterator[None]:
    """`refuse` only tags; `keep_off_refused` reports a refused champion and leaves it."""

    def refuse(name, version, live_version, reason):  # noqa: ANN001, ANN202 - the product's signature
        registry.tag_version(name, version, {deploy.policy.VERDICT_TAG: deploy.policy.REFUSED,
                                             deploy.policy.REASON_TAG: reason[:250]})
        return False

    def keep_off_refused(name, champion, live_version):  # noqa: ANN001, ANN202
        if deploy.policy.refused_reason(name, champion) is None:
            return None
        return f"@champion is v{champion}, which the deployment refused before: left alone"

    with mock.patch.object(deploy.policy, "refuse", refuse), \
            mock.patch.object(deploy.policy, "keep_off_refused", keep_off_refused):
        yield


def _loosened(**override: float):  # noqa: ANN202
    real = deploy.verify._same_detections

    def mutant(expected, served, *, iou, conf_tolerance):  # noqa: ANN001, ANN202
        return real(expected, served, **{"iou": iou, "conf_tolerance": conf_tolerance, **override})

    return mock.patch.object(deploy.verify, "_same_detections", mutant)


@contextmanager
def smoke_iou_loose() -> Iterator[None]:
    """The smoke comparison with IoU >= 0.9 instead of the configured threshold."""
    with _loosened(iou=0.9):
        yield


@contextmanager
def smoke_ignores_confidence() -> Iterator[None]:
    """The smoke comparison with no bound on the confidence difference."""
    with _loosened(conf_tolerance=float("inf")):
        yield
