"""Mutants of issue 19's guarantees: background images kept by ingest, static-batch models run by the runtime,
an imported model predicting what ultralytics predicts (tests/import_parity.py)."""

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


@contextmanager
def runtime_letterbox_top_left() -> Iterator[None]:
    """A runtime that letterboxes differently from ultralytics: the resized image at the top-left of
    the square (ultralytics' LetterBox center=False), padding on the right and bottom only. Its boxes
    still map back consistently; only what the model sees differs."""
    import numpy as np

    from serving import runtime

    original = runtime.letterbox

    def letterbox(image, size, pad_value=114):  # noqa: ANN001, ANN202
        centred, meta = original(image, size, pad_value)
        new_h, new_w = size - 2 * meta.pad_y, size - 2 * meta.pad_x
        out = np.full_like(centred, pad_value)
        out[:new_h, :new_w] = centred[meta.pad_y:meta.pad_y + new_h, meta.pad_x:meta.pad_x + new_w]
        return out, runtime.LetterboxMeta(meta.orig_h, meta.orig_w, meta.gain_x, meta.gain_y, 0, 0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "letterbox", letterbox)
        yield


@contextmanager
def runtime_drops_last_box() -> Iterator[None]:
    """A runtime whose post-processing loses the last (lowest-scored) detection of every image."""
    from serving.runtime import ModelRuntime

    original = ModelRuntime.postprocess

    def postprocess(self, raw, metas, params):  # noqa: ANN001, ANN202
        return [detections[:-1] for detections in original(self, raw, metas, params)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelRuntime, "postprocess", postprocess)
        yield


@contextmanager
def train_ignores_weights() -> Iterator[None]:
    """Training that loads train.weights but does not hand them to ultralytics (`pretrained` False):
    it starts from fresh weights whatever the config says."""
    from training import train

    original = train._train_args

    def train_args(cfg):  # noqa: ANN001, ANN202
        return {**original(cfg), "pretrained": False}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "_train_args", train_args)
        yield
