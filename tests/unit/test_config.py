"""params.yaml validation and the dataset.yaml reader: every bad value is one line naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_params, load_section
from pipelines.errors import DetopsError
from pipelines.types import YoloDataset


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("train: {epochz: 3}", "train.epochz: unknown key"),
    ("train: {epochs: ten}", "train.epochs: Input should be a valid integer"),
    ("train: {optimizer: Adamw}", "train.optimizer: Input should be 'SGD'"),
    ("ingest: {split: {train: 0.5, val: 0.2, test: 0.2}}", "split fractions must sum to 1"),
    ("tune: {space: {lr0: {type: float, low: 0, high: 1, log: true}}}", "log-scale dimension needs 'low' > 0"),
    ("validate: {min_box_side_px: -1}", "validate.min_box_side_px"),
    ("[1, 2]", "expected a mapping of sections"),
    ("train: [", "not valid YAML"),
])
def test_bad_params_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DetopsError, match=message.replace("(", r"\(")) as info:
        load_params(_params(tmp_path, text))
    assert "\n" not in str(info.value)


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = _params(tmp_path, "train: {epochs: 3}")
    assert load_section("train", path, imgsz=192).imgsz == 192
    with pytest.raises(DetopsError, match="train.imgsz: Input should be a multiple of 32"):
        load_section("train", path, imgsz=100)


@pytest.mark.parametrize(("text", "message"), [
    ("names: [", "unreadable"),
    ("- a\n- b", "expected a mapping"),
    ("names: cat", "'names' must be a non-empty list"),
    ("nc: 2", "'names' must be a non-empty list"),
])
def test_bad_dataset_yaml_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "dataset.yaml").write_text(text)
    with pytest.raises(DetopsError, match=message) as info:
        YoloDataset.load(tmp_path)
    assert "\n" not in str(info.value)


def test_dataset_names_as_mapping_keep_id_order(tmp_path: Path) -> None:
    (tmp_path / "dataset.yaml").write_text("names: {1: circle, 0: square}")
    assert YoloDataset.load(tmp_path).class_names == ["square", "circle"]
