"""Deployment-watching mutants: the guarantee that a version which breaks after the switch is switched
back by itself while the previous colour is warm (deploy/rollout.py `Deployer.guard`, run by
`detops deploy watch` and an attached `detops deploy rollout`).

- `blind`: a watcher that never judges the live version after the switch (`guard` always answers that
  nothing is watched), so a version that fails after the switch keeps serving.

Expected to fail with it: the rollback check of tests/integration/test_deploy_watch.py. The watcher
runs in its own process: `python -m tests.mutants.deploy_watch blind -- deploy watch --no-webhook`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import deploy.rollout


@contextmanager
def blind() -> Iterator[None]:
    """`Deployer.guard` sees nothing to watch: the live version is never judged after a switch."""

    def guard(self, rollout_id=None):  # noqa: ANN001, ANN202 - the product's signature
        return "none", "no rollout is being watched after its switch"

    with mock.patch.object(deploy.rollout.Deployer, "guard", guard):
        yield


MUTANTS = {"blind": blind}


def main(argv: list[str]) -> None:
    """`<mutant> -- <detops arguments>`: run the `detops` CLI with the mutant installed."""
    if len(argv) < 2 or argv[0] not in MUTANTS or argv[1] != "--":
        sys.exit(f"usage: python -m tests.mutants.deploy_watch {{{','.join(MUTANTS)}}} -- <detops arguments>")
    from pipelines.cli.main import app

    with MUTANTS[argv[0]]():
        sys.argv = ["detops", *argv[2:]]
        app()


if __name__ == "__main__":
    main(sys.argv[1:])
