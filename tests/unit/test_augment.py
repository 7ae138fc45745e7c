"""`detops augment`: real albumentations pipelines on the ingested session dataset and on hand-made images
whose objects are solid rectangles, so that each box can be checked against the pixels it encloses."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli.main import app
from pipelines.config.base import PARAMS_ENV
from pipelines.config.data import AugmentConfig, TransformSpec
from pipelines.errors import DetopsError
from pipelines.types import SPLITS, YoloDataset, YoloLabel, read_yolo_labels, write_yolo_labels
from training.augment import augment

RED = (0, 0, 255)  # BGR


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _red_box(image_path: Path) -> tuple[float, float, float, float]:
    """Normalized (cx, cy, w, h) of the red pixels of an image."""
    img = cv2.imread(str(image_path))
    ys, xs = np.nonzero((img[:, :, 2] > 200) & (img[:, :, 1] < 60) & (img[:, :, 0] < 60))
    h, w = img.shape[:2]
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h


def rect_dataset(root: Path, boxes: list[tuple[int, int, int, int]],
                 size: tuple[int, int] = (200, 100)) -> Path:
    """One PNG per split with solid red rectangles (pixel corners) on grey, labeled exactly."""
    w, h = size
    img = np.full((h, w, 3), 128, dtype=np.uint8)
    labels = []
    for x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = RED
        labels.append(YoloLabel(0, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h))
    for split in SPLITS:
        cv2.imwrite(str(_mkdir(root / "images" / split) / f"{split}0.png"), img)
        write_yolo_labels(root / "labels" / split / f"{split}0.txt", labels)
    YoloDataset(root=root, class_names=["square"]).write_yaml()
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cfg(dataset: Path, out: Path, **kw) -> AugmentConfig:
    return AugmentConfig(dataset=dataset, out=out, report=out.parent / f"{out.name}-report", **kw)


@pytest.fixture(scope="module")
def augmented(yolo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The session's ingested dataset augmented once with the default transforms, 2 copies."""
    out = tmp_path_factory.mktemp("aug") / "augmented"
    return out, augment(_cfg(yolo_dataset, out))


def test_train_gets_copies_and_val_test_stay_untouched(yolo_dataset: Path, augmented) -> None:
    out, summary = augmented
    source, target = YoloDataset.load(yolo_dataset), YoloDataset.load(out)
    assert target.class_names == source.class_names and target.splits == source.splits
    train = source.images("train")
    names = {p.name for p in target.images("train")}
    expected = {p.name for p in train} | {f"{p.stem}_aug{k}{p.suffix}" for p in train for k in (1, 2)}
    assert names == expected
    assert all(target.label_path(p).exists() for p in target.images("train"))
    assert summary.train_images == len(train) and summary.augmented_images == 2 * len(train)
    for split in ("val", "test"):
        for kind in ("images", "labels"):
            assert _files(out / kind / split) == _files(yolo_dataset / kind / split)
    # Train originals are the same bytes too; only the _aug files are new.
    for image in train:
        assert (out / "images/train" / image.name).read_bytes() == image.read_bytes()
    assert (out / "ingest_report.json").read_bytes() == (yolo_dataset / "ingest_report.json").read_bytes()
    report = json.loads((out.parent / "augmented-report/augment.json").read_text())
    assert report["augmented_images"] == 2 * len(train)
    assert report["boxes_in"] == 2 * sum(len(source.labels(p)) for p in train)
    augmented_images = [p for p in target.images("train") if "_aug" in p.name]
    assert report["boxes_out"] == sum(len(target.labels(p)) for p in augmented_images)


def test_preview_grid_is_written(augmented) -> None:
    out, summary = augmented
    preview = cv2.imread(summary.preview)
    assert preview is not None and preview.shape == (1024, 1024, 3)
    assert preview.std() > 10  # tiles were drawn, not an empty canvas


def test_boxes_stay_inside_the_image(augmented) -> None:
    out, _ = augmented
    labels = [lb for p in (out / "labels/train").glob("*_aug*.txt") for lb in read_yolo_labels(p)]
    assert labels
    for lb in labels:
        assert 0 <= lb.cx - lb.w / 2 + 1e-6 and lb.cx + lb.w / 2 - 1e-6 <= 1
        assert 0 <= lb.cy - lb.h / 2 + 1e-6 and lb.cy + lb.h / 2 - 1e-6 <= 1
        assert lb.w > 0 and lb.h > 0


def test_same_seed_same_bytes(yolo_dataset: Path, augmented, tmp_path: Path) -> None:
    out, _ = augmented
    again = tmp_path / "again"
    augment(_cfg(yolo_dataset, again))
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    augment(_cfg(yolo_dataset, other, seed=1))
    differ = [n for n, data in _files(other).items() if "_aug" in n and data != _files(out)[n]]
    assert differ


def _add_train_image(root: Path, name: str) -> None:
    for suffix, folder in ((".png", "images"), (".txt", "labels")):
        folder_path = root / folder / "train"
        (folder_path / f"{name}{suffix}").write_bytes((folder_path / f"train0{suffix}").read_bytes())


def test_an_image_s_copies_do_not_depend_on_the_others(tmp_path: Path) -> None:
    """Seeds come from (seed, image name, k): with an image more or less, the others' copies are the same."""
    transforms = [TransformSpec(name="Affine", p=1, args={"translate_percent": [-0.2, 0.2]}),
                  TransformSpec(name="RandomBrightnessContrast", p=1)]
    full, subset = (rect_dataset(tmp_path / n, [(20, 20, 60, 60)]) for n in ("full", "subset"))
    for name in ("a", "b", "c"):
        _add_train_image(full, name)
    for name in ("b", "c"):
        _add_train_image(subset, name)
    a = _files(Path(augment(_cfg(full, tmp_path / "out_full", transforms=transforms)).out))
    b = _files(Path(augment(_cfg(subset, tmp_path / "out_subset", transforms=transforms)).out))
    assert "images/train/b_aug2.png" in b and all(a[n] == data for n, data in b.items())
    # The copies of one image differ from each other (k is part of the seed).
    assert a["images/train/b_aug1.png"] != a["images/train/b_aug2.png"]


def test_transforms_fire_independently(tmp_path: Path) -> None:
    """Two p=0.5 flips must not always fire together (albumentations' Compose.set_random_seed gives
    every transform the same seed, which would make them do exactly that)."""
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])  # cx 0.225, cy 0.3
    flips = [TransformSpec(name="HorizontalFlip", p=0.5), TransformSpec(name="VerticalFlip", p=0.5)]
    augment(_cfg(ds, tmp_path / "out", transforms=flips, copies=24))
    seen = set()
    for k in range(1, 25):
        [lb] = read_yolo_labels(tmp_path / f"out/labels/train/train0_aug{k}.txt")
        seen.add((round(lb.cx, 3) != 0.225, round(lb.cy, 3) != 0.3))  # (h flipped, v flipped)
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_horizontal_flip_mirrors_the_box_exactly(tmp_path: Path) -> None:
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])
    out = tmp_path / "out"
    augment(_cfg(ds, out, transforms=[TransformSpec(name="HorizontalFlip", p=1)], copies=1))
    [label] = read_yolo_labels(out / "labels/train/train0_aug1.txt")
    assert (label.cx, label.cy, label.w, label.h) == pytest.approx((1 - 0.225, 0.3, 0.25, 0.4), abs=1e-6)
    red = _red_box(out / "images/train/train0_aug1.png")
    assert red == pytest.approx((label.cx, label.cy, label.w, label.h))


def test_boxes_follow_the_object_under_random_affine(tmp_path: Path) -> None:
    ds = rect_dataset(tmp_path / "ds", [(80, 30, 120, 70)])
    out = tmp_path / "out"
    args = {"scale": [0.8, 1.2], "translate_percent": [-0.2, 0.2]}
    transforms = [TransformSpec(name="Affine", p=1, args=args)]
    augment(_cfg(ds, out, transforms=transforms, copies=5))
    for k in range(1, 6):
        [label] = read_yolo_labels(out / f"labels/train/train0_aug{k}.txt")
        # Within 1.5 px of the red pixels (interpolation blurs the edges by up to a pixel).
        assert _red_box(out / f"images/train/train0_aug{k}.png") == pytest.approx(
            (label.cx, label.cy, label.w, label.h), abs=1.5 / 100)


@pytest.mark.parametrize("rule", ["clip", "drop"])
def test_box_cut_by_the_border_is_clipped_or_dropped(tmp_path: Path, rule: str) -> None:
    # Shifted right by 40 px, the right box spans x 170..210 of 200: 75 % inside.
    ds = rect_dataset(tmp_path / "ds", [(10, 20, 50, 60), (130, 20, 170, 60)])
    out = tmp_path / "out"
    shift = [TransformSpec(name="Affine", p=1, args={"translate_percent": {"x": [0.2, 0.2], "y": [0, 0]}})]
    summary = augment(_cfg(ds, out, transforms=shift, copies=1, bbox_rule=rule, min_visibility=0.3))
    labels = sorted(read_yolo_labels(out / "labels/train/train0_aug1.txt"), key=lambda lb: lb.cx)
    left = (70 / 200, 0.4, 40 / 200, 0.4)
    assert (labels[0].cx, labels[0].cy, labels[0].w, labels[0].h) == pytest.approx(left, abs=1e-6)
    if rule == "clip":
        assert len(labels) == 2 and summary.boxes_dropped == 0
        assert (labels[1].cx, labels[1].w) == pytest.approx((185 / 200, 30 / 200), abs=1e-6)
    else:
        assert len(labels) == 1 and summary.boxes_dropped == 1


def test_min_visibility_drops_boxes_mostly_outside_even_when_clipping(tmp_path: Path) -> None:
    ds = rect_dataset(tmp_path / "ds", [(150, 20, 190, 60)])  # shifted 40 px: 10 of 40 px inside
    shift = [TransformSpec(name="Affine", p=1, args={"translate_percent": {"x": [0.2, 0.2], "y": [0, 0]}})]
    summary = augment(_cfg(ds, tmp_path / "out", transforms=shift, copies=1, min_visibility=0.3))
    assert summary.boxes_dropped == 1
    assert read_yolo_labels(tmp_path / "out/labels/train/train0_aug1.txt") == []


def test_unknown_transform_or_bad_args_is_refused_before_writing(tmp_path: Path) -> None:
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])
    out = tmp_path / "out"
    unknown = [TransformSpec(name="HorizontalFlip"), TransformSpec(name="NoSuchFlip")]
    with pytest.raises(DetopsError, match=r"transforms\[1\] NoSuchFlip: not an albumentations transform"):
        augment(_cfg(ds, out, transforms=unknown))
    with pytest.raises(DetopsError, match=r"augment.transforms\[0\] GaussNoise: bad args .*std_range"):
        augment(_cfg(ds, out, transforms=[TransformSpec(name="GaussNoise", args={"std_range": [2, 1]})]))
    with pytest.raises(DetopsError, match=r"augment.transforms\[0\] Blur: bad args .*'sigma' are not valid"):
        augment(_cfg(ds, out, transforms=[TransformSpec(name="Blur", args={"sigma": 3})]))
    with pytest.raises(DetopsError, match="Compose: not an albumentations transform"):
        augment(_cfg(ds, out, transforms=[TransformSpec(name="Compose")]))
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_malformed_label_file_is_named(tmp_path: Path) -> None:
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])
    (ds / "labels/train/train0.txt").write_text("0 0.5 half 0.2 0.2\n")
    with pytest.raises(DetopsError, match=r"labels/train/train0.txt: not a YOLO label file"):
        augment(_cfg(ds, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_replaced(tmp_path: Path) -> None:
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])
    out = _mkdir(tmp_path / "out")
    (out / "stale.txt").write_text("from an older run")
    augment(_cfg(ds, out, copies=1))
    assert not (out / "stale.txt").exists() and (out / "images/train/train0_aug1.png").exists()


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])
    params = tmp_path / "params.yaml"
    monkeypatch.setenv(PARAMS_ENV, str(params))  # restored after the test (the CLI sets it too)
    section = {"report": str(tmp_path / "report"), "copies": 1}
    params.write_text(yaml.safe_dump({"augment": section}))
    args = ["--params", str(params), "augment", "--dataset", str(ds), "--out", str(tmp_path / "out")]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "1 augmented" in ok.output and (tmp_path / "report/preview.png").exists()
    params.write_text(yaml.safe_dump({"augment": {**section, "transforms": [{"name": "Flipp"}]}}))
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1 and "Flipp: not an albumentations transform" in bad.output


def test_background_images_are_kept_with_empty_labels(tmp_path: Path) -> None:
    """A train image with an empty label file (a labelled negative) and its copies stay, empty-labelled."""
    ds = rect_dataset(tmp_path / "ds", [(20, 10, 70, 50)])
    cv2.imwrite(str(ds / "images/train/negative.png"), np.full((100, 200, 3), 90, np.uint8))
    write_yolo_labels(ds / "labels/train/negative.txt", [])
    out = tmp_path / "out"
    augment(_cfg(ds, out, copies=2))
    for name in ("negative", "negative_aug1", "negative_aug2"):
        assert (out / f"images/train/{name}.png").is_file()
        assert (out / f"labels/train/{name}.txt").read_text() == ""
    assert (out / "labels/train/train0_aug1.txt").read_text()  # the boxed image keeps its box
