"""Evaluation slices: config errors, the slice dataset checks, the MLflow names and the plot (the real
evaluate -> register round trip with a slice is in tests/integration/test_registry.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.slices import plot_slices, read_slice_coco, slice_ground_truth, slice_mlflow_metrics
from pipelines.config.model import EvalSlice
from pipelines.errors import DetopsError
from pipelines.types import YoloDataset


def _dataset(root: Path, names: list[str]) -> Path:
    YoloDataset(root=root, class_names=names, splits=("test",)).write_yaml()
    return root


def test_a_slice_with_other_classes_is_refused(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", ["circle", "square"])
    with pytest.raises(DetopsError, match=r"slice 'dark' .* classes \['circle', 'square'\] differ"):
        slice_ground_truth("dark", EvalSlice(dataset=root), ["square", "circle"])
    with pytest.raises(DetopsError, match="no images in split 'test'"):
        slice_ground_truth("dark", EvalSlice(dataset=root), ["circle", "square"])
    with pytest.raises(DetopsError, match="not a YOLO dataset"):
        slice_ground_truth("dark", EvalSlice(dataset=tmp_path / "missing"), ["circle"])


def test_mlflow_names_cover_the_base_split_and_every_slice() -> None:
    names = slice_mlflow_metrics({"map50_95": 0.5, "map50": 0.8}, {"dark": {"map50_95": 0.1, "map50": 0.2}})
    assert names == {"map50_95/base": 0.5, "map50/base": 0.8, "map50_95/dark": 0.1, "map50/dark": 0.2}


def test_plot_and_missing_slice_outputs(tmp_path: Path) -> None:
    path = plot_slices({"champion v1": {"base": 0.5, "dark": 0.1}, "challenger v2": {"base": 0.5, "dark": 0.4}},
                       tmp_path / "p" / "slices.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DetopsError, match="slice 'dark' was not evaluated"):
        read_slice_coco(tmp_path, "dark")
    (tmp_path / "slices" / "dark").mkdir(parents=True)
    (tmp_path / "slices" / "dark" / "coco_gt.json").write_text(json.dumps({"images": []}))
    (tmp_path / "slices" / "dark" / "coco_dt.json").write_text("{broken")
    with pytest.raises(DetopsError, match="not valid JSON"):
        read_slice_coco(tmp_path, "dark")
