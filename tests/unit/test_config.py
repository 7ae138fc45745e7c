"""params.yaml validation and the dataset.yaml reader: every bad value is one line naming its key."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import pipelines.config
from pipelines.config.base import Section, load_section, read_params
from pipelines.environment import PROJECT_ROOT
from pipelines.errors import DetopsError
from pipelines.types import YoloDataset


def sections() -> dict[str, type[Section]]:
    """Every top-level section model of every module of pipelines.config, by its params.yaml key."""
    found = {}
    for info in pkgutil.iter_modules(pipelines.config.__path__):
        module = importlib.import_module(f"pipelines.config.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Section) and value.section:
                found[value.section] = value
    return found


def load_all(path: Path) -> None:
    for key in read_params(path):
        if key not in sections():
            raise DetopsError(f"{path}: {key}: unknown section")
        load_section(sections()[key], path)


def test_the_repository_params_are_valid_and_every_section_is_written_out() -> None:
    path = PROJECT_ROOT / "params.yaml"
    load_all(path)
    assert set(read_params(path)) == set(sections())  # every setting a user can change is in the file


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
    ("trian: {epochs: 3}", "trian: unknown section"),
    ("train: [1]", "train: expected a mapping of keys"),
])
def test_bad_params_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DetopsError, match=message.replace("(", r"\(")) as info:
        load_all(_params(tmp_path, text))
    assert "\n" not in str(info.value)


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = _params(tmp_path, "train: {epochs: 3}")
    from pipelines.config.model import TrainConfig

    assert load_section(TrainConfig, path, imgsz=192).imgsz == 192
    assert load_section(TrainConfig, path, imgsz=192).epochs == 3
    with pytest.raises(DetopsError, match="train.imgsz: Input should be a multiple of 32"):
        load_section(TrainConfig, path, imgsz=100)


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


def test_evaluation_slices_are_named_datasets_and_base_is_reserved() -> None:
    from pydantic import ValidationError

    from pipelines.config.model import EvaluateConfig

    cfg = EvaluateConfig(slices={"dark-1": {"dataset": "data/slices/dark"}})
    assert cfg.slices["dark-1"].split == "test" and cfg.slices["dark-1"].dataset == Path("data/slices/dark")
    with pytest.raises(ValidationError, match="reserved"):
        EvaluateConfig(slices={"base": {"dataset": "x"}})
    with pytest.raises(ValidationError, match="slices"):
        EvaluateConfig(slices={"no spaces": {"dataset": "x"}})
    with pytest.raises(ValidationError, match="split"):
        EvaluateConfig(slices={"dark": {"dataset": "x", "split": "holdout"}})
