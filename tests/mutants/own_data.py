"""Mutants of issue 19's guarantees: background images kept by ingest, static-batch models run by the runtime."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def ingest_drops_background() -> Iterator[None]:
    """The old ingest: a submitted empty annotation is skipped as empty instead of kept."""
    from labeling import ingest

    original = ingest._Ingest.task

    def task(self, task, where, root, feedback=False):  # noqa: ANN001, ANN202
        chosen = ingest.select_annotation(task.annotations, self.cfg.annotator_policy)
        if chosen is not None and not chosen.result:
            self.report.tasks += 1
            self.skipped["empty"].append(task.id)
            return None
        return original(self, task, where, root, feedback)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ingest._Ingest, "task", task)
        yield


@contextmanager
def runtime_without_chunks() -> Iterator[None]:
    """The old runtime: the whole batch in one run, whatever batch the model was exported with."""
    from serving.runtime import ModelRuntime

    def infer(self, batch):  # noqa: ANN001, ANN202
        return self.session.run(None, {self.input_name: batch})[0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelRuntime, "infer", infer)
        yield
