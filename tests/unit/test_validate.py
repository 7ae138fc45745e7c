"""`detops validate`: real Great Expectations suites on small hand-made YOLO datasets, clean and broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli.main import app
from pipelines.config.base import PARAMS_ENV
from pipelines.config.data import MinInstances, ValidateConfig
from pipelines.errors import DataValidationError, DetopsError
from pipelines.types import YoloDataset, YoloLabel, write_yolo_labels
from training.validate import validate

NAMES = ["square", "circle"]


def _image(seed: int, width: int, height: int) -> np.ndarray:
    """A small image whose content depends on `seed`, so that every image has its own hash."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    cv2.rectangle(img, (10, 10), (width // 2, height // 2), (0, 0, 255), -1)
    return img


def make_dataset(root: Path, layout: dict[str, list[tuple[str, list[YoloLabel]]]],
                 size: tuple[int, int] = (120, 80)) -> Path:
    """Write a YOLO dataset like ingest does: images, labels, dataset.yaml and ingest_report.json with
    each image's annotated (Label Studio) size."""
    report = []
    seed = 0
    for split, items in layout.items():
        for name, labels in items:
            seed += 1
            path = root / "images" / split / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), _image(seed, *size))
            write_yolo_labels(root / "labels" / split / f"{name}.txt", labels)
            report.append({"split": split, "image": path.name,
                           "original_width": size[0], "original_height": size[1]})
    YoloDataset(root=root, class_names=NAMES, splits=tuple(layout)).write_yaml()
    (root / "ingest_report.json").write_text(json.dumps({"images": report}))
    return root


def _both() -> list[YoloLabel]:
    return [YoloLabel(0, 0.25, 0.3, 0.2, 0.3), YoloLabel(1, 0.7, 0.6, 0.3, 0.4)]


@pytest.fixture()
def clean(tmp_path: Path) -> Path:
    """Two instances of each class in train, one in val and test: the thresholds of `cfg`."""
    return make_dataset(tmp_path / "ds", {
        "train": [("t1", _both()), ("t2", _both())],
        "val": [("v1", _both())],
        "test": [("s1", _both())],
    })


def cfg(dataset: Path, **kw) -> ValidateConfig:
    return ValidateConfig(dataset=dataset, report=dataset.parent / "report",
                          min_instances_per_class=MinInstances(train=2, val=1, test=1), **kw)


def _fails(dataset: Path, **kw) -> str:
    with pytest.raises(DataValidationError) as exc:
        validate(cfg(dataset, **kw))
    return str(exc.value)


def test_clean_dataset_passes_and_writes_reports(clean: Path) -> None:
    summary = validate(cfg(clean))
    assert summary.success and summary.n_images == 4 and summary.n_boxes == 8
    assert summary.images_per_split == {"train": 2, "val": 1, "test": 1}
    report = clean.parent / "report"
    payload = json.loads((report / "validation.json").read_text())
    assert payload["success"] is True
    names = {e["name"] for e in payload["expectations"]}
    assert {"image decodes", "no image in two splits (same content hash)",
            "enough instances per class per split"} <= names
    assert all(e["success"] for e in payload["expectations"])
    metrics = json.loads((report / "summary.json").read_text())
    assert metrics == {"success": True, "images": 4, "boxes": 8, "expectations": len(names),
                       "failed_expectations": 0, "images_train": 2, "images_val": 1, "images_test": 1,
                       "background_images": 0}
    page = (report / "validation.html").read_text()
    assert "PASSED" in page and 'class="fail"' not in page


def test_box_outside_image(clean: Path) -> None:
    write_yolo_labels(clean / "labels/train/t1.txt", [*_both(), YoloLabel(0, 0.95, 0.5, 0.2, 0.2)])
    msg = _fails(clean)
    assert "box inside image (x2 <= image width)" in msg and "train/t1.jpg" in msg
    assert "x2=126.0" in msg  # (0.95 + 0.1) * 120 px
    assert "y2 <= image height" not in msg


def test_zero_size_box(clean: Path) -> None:
    write_yolo_labels(clean / "labels/val/v1.txt", [*_both(), YoloLabel(1, 0.5, 0.5, 0.0, 0.2)])
    msg = _fails(clean)
    assert "box width >= 2 px" in msg and "val/v1.jpg" in msg
    assert "box height" not in msg


def test_unknown_class_id(clean: Path) -> None:
    write_yolo_labels(clean / "labels/test/s1.txt", [*_both(), YoloLabel(7, 0.5, 0.5, 0.2, 0.2)])
    msg = _fails(clean)
    assert "class id in the label set (0..1)" in msg and "test/s1.jpg (class_id=7)" in msg


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_image_that_does_not_decode(clean: Path, corruption: str) -> None:
    path = clean / "images/train/t2.jpg"
    data = path.read_bytes()
    path.write_bytes(b"this is not a jpeg" if corruption == "garbage" else data[: len(data) // 2])
    msg = _fails(clean)
    assert "image decodes" in msg and "train/t2.jpg" in msg
    # The other checks still run on the image's annotated size and do not pile up errors.
    assert "box inside image" not in msg


def test_size_mismatch(clean: Path) -> None:
    cv2.imwrite(str(clean / "images/val/v1.jpg"), _image(99, 100, 80))  # annotated as 120x80
    msg = _fails(clean)
    assert "image size matches the annotated size (tolerance 0 px)" in msg
    assert "val/v1.jpg (size_mismatch_px=20" in msg
    validate(cfg(clean, size_tolerance_px=20))  # within a wider tolerance it passes


def test_same_image_in_train_and_test(clean: Path) -> None:
    shutil.copyfile(clean / "images/train/t1.jpg", clean / "images/test/leak.jpg")
    shutil.copyfile(clean / "labels/train/t1.txt", clean / "labels/test/leak.txt")
    msg = _fails(clean)
    assert "no image in two splits (same content hash)" in msg
    assert "train/t1.jpg" in msg and "test/leak.jpg" in msg


def test_same_image_twice_in_one_split_is_not_leakage(clean: Path) -> None:
    shutil.copyfile(clean / "images/train/t1.jpg", clean / "images/train/t1_copy.jpg")
    shutil.copyfile(clean / "labels/train/t1.txt", clean / "labels/train/t1_copy.txt")  # not a background image
    assert validate(cfg(clean)).success


def test_too_few_instances_of_a_class_in_a_split(clean: Path) -> None:
    write_yolo_labels(clean / "labels/train/t2.txt", [YoloLabel(0, 0.25, 0.3, 0.2, 0.3)])
    msg = _fails(clean)
    assert "enough instances per class per split" in msg
    assert "train circle (instances=1, required=2)" in msg
    assert "train square" not in msg


def test_empty_split(clean: Path) -> None:
    (clean / "images/val/v1.jpg").unlink()
    (clean / "labels/val/v1.txt").unlink()
    msg = _fails(clean)
    assert "every split non-empty (train, val, test): missing: val" in msg


def test_malformed_label_line(clean: Path) -> None:
    (clean / "labels/train/t1.txt").write_text("0 0.5 0.5 zero 0.2\n")
    msg = _fails(clean)
    assert "label file parses" in msg and "train/t1.jpg" in msg


def test_failure_report_marks_failed_rows(clean: Path) -> None:
    write_yolo_labels(clean / "labels/train/t1.txt", [*_both(), YoloLabel(5, 0.5, 0.5, 0.2, 0.2)])
    _fails(clean)
    report = clean.parent / "report"
    payload = json.loads((report / "validation.json").read_text())
    failed = [e for e in payload["expectations"] if not e["success"]]
    assert [e["name"] for e in failed] == ["class id in the label set (0..1)"]
    assert failed[0]["table"] == "annotations" and failed[0]["observed"] == "1 of 9 rows fail"
    assert json.loads((report / "summary.json").read_text())["failed_expectations"] == 1
    page = (report / "validation.html").read_text()
    assert "FAILED (1 expectations)" in page and page.count('class="fail"') == 1


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DetopsError, match="no dataset.yaml"):
        validate(cfg(tmp_path))


def test_cli_exit_codes(clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    thresholds = {"train": 2, "val": 1, "test": 1}
    params.write_text(yaml.safe_dump({"validate": {"min_instances_per_class": thresholds}}))
    monkeypatch.setenv(PARAMS_ENV, str(params))  # restored after the test (the CLI sets it too)
    args = ["--params", str(params), "validate", "--dataset", str(clean), "--report", str(tmp_path / "r")]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "passed" in ok.output
    write_yolo_labels(clean / "labels/train/t1.txt", [*_both(), YoloLabel(0, 0.95, 0.5, 0.2, 0.2)])
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1
    assert "error:" in bad.output and "x2 <= image width" in bad.output


def test_size_check_says_when_it_has_nothing_to_compare(clean: Path) -> None:
    (clean / "ingest_report.json").unlink()
    summary = validate(cfg(clean))
    size = [o for o in summary.outcomes if o.name.startswith("image size matches")]
    assert size[0].observed == "not checked: ingest_report.json records no annotated image sizes"


def test_dataset_written_by_ingest_passes(yolo_dataset: Path, tmp_path: Path) -> None:
    """The session's synthetic project, ingested for real: 48 images are too few for the default
    thresholds, so one instance per class and split is required here."""
    summary = validate(ValidateConfig(dataset=yolo_dataset, report=tmp_path / "r",
                                      min_instances_per_class=MinInstances(train=1, val=1, test=1)))
    assert summary.success and summary.n_images > 0 and summary.n_boxes >= summary.n_images
    [size] = [o for o in summary.outcomes if o.name.startswith("image size matches")]
    assert size.success and not str(size.observed).startswith("not checked"), size.observed


def test_an_expectation_that_cannot_run_fails_with_its_reason() -> None:
    import great_expectations.expectations as gxe
    import pandas as pd

    from training.validate import run_suites

    broken = gxe.ExpectColumnValuesToBeBetween(column="nope", min_value=0, meta={"name": "typo"})
    [outcome] = run_suites({"images": pd.DataFrame({"image": ["a.jpg"], "x": [1]})}, {"images": [broken]})
    assert not outcome.success
    assert outcome.observed == 'could not run: Error: The column "nope" in BatchData does not exist.'


def test_unreadable_ingest_report_is_named(clean: Path) -> None:
    (clean / "ingest_report.json").write_text('{"images": [{"image": "t1.jpg", "original_width": 120, '
                                              '"original_height": 80}]}')  # no split
    with pytest.raises(DetopsError,
                       match=r"ingest_report.json: unreadable per-image sizes \(KeyError: 'split'\)"):
        validate(cfg(clean))


def test_share_of_background_images_is_an_expectation(tmp_path: Path) -> None:
    """Background images (empty label files) count towards a share bounded by validate.background_share."""
    from pipelines.config.data import BackgroundShare

    layout = {"train": [("t1", _both()), ("t2", _both()), ("b1", []), ("b2", [])],
              "val": [("v1", _both())], "test": [("s1", _both())]}
    dataset = make_dataset(tmp_path / "ds", layout)  # 2 of 6 images are background
    summary = validate(cfg(dataset, background_share=BackgroundShare(min=0.2, max=0.4)))
    assert summary.background_per_split == {"train": 2, "val": 0, "test": 0}
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["background_images"] == 2
    message = _fails(dataset)  # the default allows at most 10 %
    assert "background images (no box) are 0%-10% of the images: 0.333" in message
    assert "background images (no box) are 50%-100%" in _fails(dataset, background_share=BackgroundShare(min=0.5,
                                                                                                       max=1.0))
    with pytest.raises(ValueError, match="must not exceed"):
        BackgroundShare(min=0.5, max=0.2)
