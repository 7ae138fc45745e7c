"""labeling.ingest on hand-made Label Studio exports (real images, real files) and on the synthetic project."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from labeling.ingest import REPORT_NAME, assign_splits, ingest, rectangle_corners
from pipelines.cli.main import app
from pipelines.config.data import IngestConfig, SplitFractions
from pipelines.errors import DetopsError
from pipelines.types import SPLITS, Box, YoloDataset

CLASSES = ["zebra", "apple", "mango"]  # deliberately not alphabetical
CONFIG_XML = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="zebra"/><Label value="apple"/><Label value="mango"/>
  </RectangleLabels>
</View>"""


def rect(x, y, w, h, label, size, rotation=0.0, rid="r"):
    """A rectanglelabels region in percent, as Label Studio exports it."""
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": size[0], "original_height": size[1],
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def annotation(result, aid=1, updated="2024-01-01T00:00:00Z", created=None, cancelled=False, gt=False):
    return {"id": aid, "result": result, "was_cancelled": cancelled, "ground_truth": gt,
            "created_at": created or updated, "updated_at": updated}


def make_image(folder: Path, name: str, size=(200, 120), seed=0) -> Path:
    """A real JPEG whose content (so hash) depends on `seed`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path = folder / name
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_project(root: Path, tasks: list[dict], config: str | None = CONFIG_XML) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "labeling_config.xml").write_text(config)
    export = root / "export.json"
    export.write_text(json.dumps(tasks))
    return export


def simple_project(root: Path, n: int, seed0: int = 0, classes=CLASSES, size=(200, 120)) -> Path:
    """n tasks with one box each, cycling through `classes`; images under root/images."""
    tasks = []
    for i in range(n):
        name = f"img{seed0 + i}.jpg"
        make_image(root / "images", name, size, seed=seed0 + i)
        label = classes[i % len(classes)]
        tasks.append({"id": seed0 + i + 1, "data": {"image": f"/data/local-files/?d=images/{name}"},
                      "annotations": [annotation([rect(10 + i % 5, 20, 30, 40, label, size)])]})
    return write_project(root, tasks)


def cfg_for(export, out: Path, **kw) -> IngestConfig:
    export_paths = export if isinstance(export, list) else Path(export)
    first = export[0] if isinstance(export, list) else export
    kw.setdefault("labeling_config", Path(first).parent / "labeling_config.xml")
    return IngestConfig(export=export_paths, out=out, **kw)


def labels_by_stem(out: Path) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """Original stem -> YOLO label rows, for every image written."""
    ds = YoloDataset.load(out)
    rows = {}
    for split in SPLITS:
        for img in ds.images(split):
            stem = img.stem.split("_", 1)[1]
            rows[stem] = [(lb.class_id, lb.cx, lb.cy, lb.w, lb.h) for lb in ds.labels(img)]
    return rows


def split_by_stem(out: Path) -> dict[str, str]:
    ds = YoloDataset.load(out)
    return {img.stem.split("_", 1)[1]: split for split in SPLITS for img in ds.images(split)}


# --------------------------------------------------------------------------- SDK agreement
def test_unrotated_boxes_agree_with_the_sdk_yolo_converter(tmp_path):
    from label_studio_sdk.converter import Converter

    root = tmp_path / "proj"
    tasks = []
    rng = np.random.default_rng(3)
    for i in range(12):
        size = (int(rng.integers(100, 300)), int(rng.integers(80, 260)))
        name = f"pic{i}.jpg"
        make_image(root / "images", name, size, seed=i)
        regions = []
        for j in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(1, 100 - x), rng.uniform(1, 100 - y)
            regions.append(rect(x, y, w, h, CLASSES[(i + j) % 3], size, rid=f"r{i}-{j}"))
        ref = f"/data/upload/7/{name}" if i % 4 == 0 else f"/data/local-files/?d=images/{name}"
        tasks.append({"id": i + 1, "data": {"image": ref}, "annotations": [annotation(regions)]})
    export = write_project(root, tasks)
    out = tmp_path / "ds"
    ingest(cfg_for(export, out))

    sdk_out = tmp_path / "sdk"
    Converter(config=CONFIG_XML, project_dir=str(root), download_resources=False).convert_to_yolo(
        str(export), str(sdk_out), is_dir=False)
    sdk_names = (sdk_out / "classes.txt").read_text().split()
    assert sdk_names == sorted(CLASSES)  # the SDK numbers classes alphabetically; we must not
    ours = labels_by_stem(out)
    assert len(ours) == 12
    compared = 0
    for stem, rows in ours.items():
        sdk_rows = [line.split() for line in (sdk_out / "labels" / f"{stem}.txt").read_text().splitlines()]
        sdk = sorted((CLASSES.index(sdk_names[int(r[0])]), *map(float, r[1:])) for r in sdk_rows)
        assert len(sdk) == len(rows)
        for a, b in zip(sorted(rows), sdk):
            assert a[0] == b[0]
            assert a[1:] == pytest.approx(b[1:], abs=1e-6)
            compared += 1
    assert compared >= 12
    names = YoloDataset.load(out).class_names
    assert names == CLASSES


# --------------------------------------------------------------------------- rotation
def raster_bbox(x, y, w, h, rotation, size) -> Box:
    """Independent reference: draw the unrotated rectangle, rotate the mask with OpenCV about the
    top-left corner (OpenCV's positive angle is counter-clockwise, so negate), take the mask's bbox."""
    import cv2

    W, H = size
    pad = max(W, H)
    canvas = np.zeros((H + 2 * pad, W + 2 * pad), np.uint8)
    x0, y0, pw, ph = x / 100 * W + pad, y / 100 * H + pad, w / 100 * W, h / 100 * H
    poly = np.array([[x0, y0], [x0 + pw, y0], [x0 + pw, y0 + ph], [x0, y0 + ph]])
    cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], 255, shift=4)
    matrix = cv2.getRotationMatrix2D((x0, y0), -rotation, 1.0)
    rotated = cv2.warpAffine(canvas, matrix, canvas.shape[::-1], flags=cv2.INTER_NEAREST)[pad:pad + H, pad:pad + W]
    ys, xs = np.nonzero(rotated)
    return Box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


ROTATED = [(30, 20, 30, 25, 30.0), (50, 10, 20, 40, 75.0), (40, 40, 35, 20, -20.0), (60, 50, 30, 30, 200.0)]


def test_rotated_rectangles_match_an_independent_raster_on_a_non_square_image(tmp_path):
    size = (320, 120)  # strongly non-square: rotating in percent units would shear
    root = tmp_path / "proj"
    tasks = []
    for i, (x, y, w, h, r) in enumerate(ROTATED):
        make_image(root / "images", f"rot{i}.jpg", size, seed=i)
        tasks.append({"id": i + 1, "data": {"image": f"images/rot{i}.jpg"},
                      "annotations": [annotation([rect(x, y, w, h, "apple", size, rotation=r)])]})
    out = tmp_path / "ds"
    report = ingest(cfg_for(write_project(root, tasks), out, clip_tolerance=0.1))
    assert report.rotated_boxes == len(ROTATED)
    ours = labels_by_stem(out)
    from label_studio_sdk.converter import Converter

    for i, (x, y, w, h, r) in enumerate(ROTATED):
        (cls, cx, cy, bw, bh), = ours[f"rot{i}"]
        box = Box.from_yolo(cx, cy, bw, bh, *size)
        ref = raster_bbox(x, y, w, h, r, size)
        for got, want in zip((box.x1, box.y1, box.x2, box.y2), (ref.x1, ref.y1, ref.x2, ref.y2)):
            assert got == pytest.approx(want, abs=1.5)
        # The SDK's COCO geometry rotates in percent units: on this image it is off by many pixels.
        sx, sy, sw, sh = Converter.rotated_rectangle({"x": x, "y": y, "width": w, "height": h, "rotation": r})
        sdk = Box(sx / 100 * size[0], sy / 100 * size[1], (sx + sw) / 100 * size[0], (sy + sh) / 100 * size[1])
        sdk = Box(max(sdk.x1, 0), max(sdk.y1, 0), min(sdk.x2, size[0]), min(sdk.y2, size[1]))
        assert sdk.iou(ref) < box.iou(ref) - 0.05


def test_rotation_geometry_turns_clockwise_about_the_top_left_corner():
    corners = rectangle_corners(10, 10, 20, 10, 90, 100, 100)  # 20x10 px at (10, 10), turned 90 deg
    expected = [(10, 10), (10, 30), (0, 30), (0, 10)]  # clockwise on screen: +x goes to +y (down)
    for (gx, gy), (ex, ey) in zip(corners, expected):
        assert gx == pytest.approx(ex) and gy == pytest.approx(ey)
    assert rectangle_corners(10, 10, 20, 10, 0, 200, 100)[2] == pytest.approx((60, 20))
    assert math.isclose(rectangle_corners(0, 0, 10, 10, 45, 100, 100)[1][1], 10 / math.sqrt(2))


# --------------------------------------------------------------------------- policies
def policy_project(root: Path) -> Path:
    size = (160, 100)
    for i in range(6):
        make_image(root / "images", f"p{i}.jpg", size, seed=100 + i)
    early, late = "2024-01-01T10:00:00Z", "2024-01-02T10:00:00Z"
    polygon = {"id": "poly", "type": "polygonlabels", "from_name": "poly", "to_name": "image",
               "original_width": 160, "original_height": 100,
               "value": {"points": [[1, 1], [5, 5], [1, 9]], "polygonlabels": ["zebra"]}}
    choice = {"id": "ch", "type": "choices", "from_name": "quality", "to_name": "image",
              "value": {"choices": ["good"]}}
    tasks = [
        # two annotators: the early one says zebra, the late one apple
        {"id": 1, "data": {"image": "images/p0.jpg"}, "annotations": [
            annotation([rect(10, 10, 20, 20, "apple", size)], aid=12, updated=late, created=early),
            annotation([rect(10, 10, 20, 20, "zebra", size)], aid=11, updated=early)]},
        # a cancelled later annotation must be ignored
        {"id": 2, "data": {"image": "images/p1.jpg"}, "annotations": [
            annotation([rect(10, 10, 20, 20, "mango", size)], aid=21, updated=early),
            annotation([rect(10, 10, 20, 20, "zebra", size)], aid=22, updated=late, cancelled=True)]},
        # only cancelled: skipped
        {"id": 3, "data": {"image": "images/p2.jpg"}, "annotations": [
            annotation([rect(10, 10, 20, 20, "mango", size)], aid=31, cancelled=True)]},
        # no annotations at all: skipped
        {"id": 4, "data": {"image": "images/p3.jpg"}, "annotations": []},
        # a box plus a polygon and a classification: the box stays, two regions are counted
        {"id": 5, "data": {"image": "images/p4.jpg"}, "annotations": [
            annotation([rect(50, 50, 10, 10, "zebra", size), polygon, choice], aid=51)]},
        # ground truth wins although it is the older one; plus an empty annotation task below
        {"id": 6, "data": {"image": "images/p5.jpg"}, "annotations": [
            annotation([rect(10, 10, 20, 20, "mango", size)], aid=61, updated=early, gt=True),
            annotation([rect(10, 10, 20, 20, "apple", size)], aid=62, updated=late)]},
        {"id": 7, "data": {"image": "images/p4.jpg"}, "annotations": [annotation([choice], aid=71)]},
    ]
    return write_project(root, tasks)


@pytest.mark.parametrize("policy, task1_class", [("latest", "apple"), ("first", "zebra")])
def test_annotator_cancelled_non_rectangle_and_empty_policies(tmp_path, policy, task1_class):
    export = policy_project(tmp_path / "proj")
    out = tmp_path / "ds"
    report = ingest(cfg_for(export, out, annotator_policy=policy))
    rows = labels_by_stem(out)
    assert rows["p0"][0][0] == CLASSES.index(task1_class)
    assert rows["p1"][0][0] == CLASSES.index("mango")
    assert rows["p5"][0][0] == CLASSES.index("mango")  # ground truth beats both policies
    assert set(rows) == {"p0", "p1", "p4", "p5"}
    assert report.skipped_tasks == {"all_annotations_cancelled": [3], "no_annotations": [4], "empty": [7]}
    assert report.skipped_regions["non_rectangle"].count == 3  # polygon + 2 choices
    assert report.skipped_regions["non_rectangle"].tasks == [5, 7]
    assert report.cancelled_annotations_ignored == 2
    assert report.multi_annotator_tasks == 2 and report.ground_truth_used == 1
    assert report.tasks == 7 and report.images_written == 4
    assert report.policy["annotator"].startswith(policy)
    on_disk = json.loads((out / REPORT_NAME).read_text())
    assert on_disk["skipped_tasks"] == report.skipped_tasks
    assert sum(sum(v.values()) for v in on_disk["boxes_per_class_per_split"].values()) == 4


def test_without_labeling_config_classes_follow_first_appearance(tmp_path):
    root = tmp_path / "proj"
    export = simple_project(root, 6, classes=["mango", "zebra", "apple"])
    (root / "labeling_config.xml").unlink()
    report = ingest(IngestConfig(export=export, out=tmp_path / "ds", labeling_config=None))
    assert report.class_order == "first_seen" and report.class_names == ["mango", "zebra", "apple"]
    assert any("first appear" in note for note in report.notes)
    assert YoloDataset.load(tmp_path / "ds").class_names == ["mango", "zebra", "apple"]


def test_labeling_config_is_found_beside_the_export_when_unset(tmp_path):
    export = simple_project(tmp_path / "proj", 3)
    report = ingest(IngestConfig(export=export, out=tmp_path / "ds", labeling_config=None))
    assert report.class_order == "labeling_config" and report.class_names == CLASSES


# --------------------------------------------------------------------------- several exports, dedup
def test_several_exports_merge_and_duplicate_images_are_kept_once(tmp_path):
    old = simple_project(tmp_path / "old", 6)
    new_root = tmp_path / "new"
    size = (200, 120)
    # The same pixels as old img0 (relabeled later) plus one new image, in another folder layout.
    (new_root / "upload" / "3").mkdir(parents=True)
    (new_root / "upload" / "3" / "copy.jpg").write_bytes((tmp_path / "old" / "images" / "img0.jpg").read_bytes())
    make_image(new_root / "upload" / "3", "fresh.jpg", size, seed=999)
    tasks = [{"id": 101, "data": {"image": "/data/upload/3/copy.jpg"},
              "annotations": [annotation([rect(5, 5, 10, 10, "mango", size)], updated="2025-01-01T00:00:00Z")]},
             {"id": 102, "data": {"image": "/data/upload/3/fresh.jpg"},
              "annotations": [annotation([rect(5, 5, 10, 10, "apple", size)])]}]
    new = write_project(new_root, tasks)
    out = tmp_path / "ds"
    report = ingest(cfg_for([old, new], out))
    assert report.tasks == 8 and report.images_written == 7
    assert report.skipped_tasks == {"duplicate_image": [1]}  # the older labeling of the same image lost
    rows = labels_by_stem(out)
    assert rows["copy"][0][0] == CLASSES.index("mango") and "img0" not in rows
    assert "fresh" in rows

    # CLI: repeatable --export
    result = CliRunner().invoke(app, ["ingest", "--export", str(old), "--export", str(new), "--out",
                                      str(tmp_path / "ds2"), "--labeling-config",
                                      str(tmp_path / "old" / "labeling_config.xml")])
    assert result.exit_code == 0, result.output
    assert labels_by_stem(tmp_path / "ds2") == rows


# --------------------------------------------------------------------------- splits
def test_split_is_deterministic_and_stable_when_images_are_added(tmp_path):
    base = simple_project(tmp_path / "a", 60)
    ingest(cfg_for(base, tmp_path / "ds1", seed=5))
    ingest(cfg_for(base, tmp_path / "ds2", seed=5))
    first = split_by_stem(tmp_path / "ds1")
    assert first == split_by_stem(tmp_path / "ds2")
    assert set(first.values()) == set(SPLITS)

    more = simple_project(tmp_path / "b", 40, seed0=1000)
    report = ingest(cfg_for([base, more], tmp_path / "ds3", seed=5))
    assert report.split.rebalanced == []  # every class already in every split: nothing moved
    grown = split_by_stem(tmp_path / "ds3")
    assert {k: grown[k] for k in first} == first
    other_seed = ingest(cfg_for(base, tmp_path / "ds4", seed=6))
    assert split_by_stem(tmp_path / "ds4") != first and other_seed.images_written == 60


def test_rebalance_puts_every_class_in_every_split_where_possible(tmp_path):
    fractions = SplitFractions(train=0.8, val=0.1, test=0.1)
    classes_of = {f"h{i:03d}": {0} for i in range(40)}
    classes_of.update({f"rare{i}": {1} for i in range(3)})
    classes_of["solo"] = {2}
    split, moves = assign_splits(classes_of, fractions, seed=0, n_classes=3)
    rare_splits = sorted(split[f"rare{i}"] for i in range(3))
    assert rare_splits == sorted(SPLITS)
    assert all(any(split[h] == s for h, c in classes_of.items() if 0 in c) for s in SPLITS)
    assert all(c == 1 or c == 0 for _, _, _, c in moves)  # the single-image class cannot be spread
    again = assign_splits(classes_of, fractions, seed=0, n_classes=3)
    assert again == (split, moves)

    # End to end: the report lists the moves and every class is present in every split.
    root = tmp_path / "proj"
    tasks, size = [], (120, 90)
    for i in range(30):
        make_image(root / "images", f"c{i}.jpg", size, seed=i)
        label = "apple" if i < 3 else "zebra" if i % 2 else "mango"
        tasks.append({"id": i + 1, "data": {"image": f"images/c{i}.jpg"},
                      "annotations": [annotation([rect(10, 10, 30, 30, label, size)])]})
    report = ingest(cfg_for(write_project(root, tasks), tmp_path / "ds"))
    for s in SPLITS:
        assert all(report.boxes_per_class_per_split[s][c] >= 1 for c in CLASSES), report.boxes_per_class_per_split
    assert all(m["to"] in SPLITS and m["from"] != m["to"] for m in report.split.rebalanced)


# --------------------------------------------------------------------------- bad input
def bad_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """An export with one problem; returns it and a fragment the error must contain."""
    size = (200, 120)
    root = tmp_path / case
    make_image(root / "images", "ok.jpg", size, seed=1)
    good = {"id": 1, "data": {"image": "images/ok.jpg"},
            "annotations": [annotation([rect(10, 10, 20, 20, "apple", size)])]}
    bad = {"id": 42, "data": {"image": "images/ok2.jpg"},
           "annotations": [annotation([rect(10, 10, 20, 20, "apple", size)])]}
    expect = "task 42"
    if case == "malformed_json":
        write_project(root, [])
        (root / "export.json").write_text('[{"id": 1, "data": ')
        return root / "export.json", "not valid JSON"
    if case == "no_image_key":
        bad["data"] = {"picture": "images/ok.jpg"}
    elif case == "no_data":
        del bad["data"]
        expect = "task 42: data"
    elif case == "missing_file":
        expect = "task 42: image 'images/ok2.jpg' not found"
    elif case == "x_150":
        bad["annotations"][0]["result"][0]["value"]["x"] = 150
        expect = "out of the image"
    elif case == "negative_width":
        bad["annotations"][0]["result"][0]["value"]["width"] = -5
        expect = "non-positive size"
    elif case == "unknown_label":
        bad["annotations"][0]["result"][0]["value"]["rectanglelabels"] = ["banana"]
        expect = "'banana' is not in the labeling config"
    elif case == "size_mismatch":
        bad["annotations"][0]["result"][0]["original_width"] = 640
        expect = "original_width=640"
    elif case == "not_an_image":
        (root / "images" / "ok2.jpg").write_text("definitely not a jpeg")
        expect = "cannot be decoded"
    elif case == "string_coordinate":
        bad["annotations"][0]["result"][0]["value"]["y"] = "top"
        expect = "value.y"
    if case not in ("missing_file", "not_an_image"):
        make_image(root / "images", "ok2.jpg", size, seed=2)
    return write_project(root, [good, bad]), expect


BAD_CASES = ["malformed_json", "no_image_key", "no_data", "missing_file", "x_150", "negative_width",
             "unknown_label", "size_mismatch", "not_an_image", "string_coordinate"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_error_naming_the_task(tmp_path, case):
    export, expect = bad_case(tmp_path, case)
    with pytest.raises(DetopsError) as info:
        ingest(cfg_for(export, tmp_path / "out"))
    message = str(info.value)
    assert expect in message and "\n" not in message
    if case != "malformed_json":
        assert "task 42" in message
    assert not (tmp_path / "out").exists()

    result = CliRunner().invoke(app, ["ingest", "--export", str(export), "--out", str(tmp_path / "cli"),
                                      "--labeling-config", str(export.parent / "labeling_config.xml")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("error: ") and expect in lines[0]


def test_slightly_out_of_range_boxes_are_clipped(tmp_path):
    size = (200, 100)
    root = tmp_path / "proj"
    make_image(root / "images", "a.jpg", size)
    tasks = [{"id": 1, "data": {"image": "images/a.jpg"},
              "annotations": [annotation([rect(-0.5, 60, 50.5, 40.8, "zebra", size)])]}]
    report = ingest(cfg_for(write_project(root, tasks), tmp_path / "ds"))
    assert report.clipped_boxes == 1
    (_, cx, cy, w, h), = labels_by_stem(tmp_path / "ds")["a"]
    box = Box.from_yolo(cx, cy, w, h, *size)
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((0, 60, 100, 100), abs=1e-3)


def test_exif_orientation_is_compared_as_displayed(tmp_path):
    root = tmp_path / "proj"
    (root / "images").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 100x60, displayed 60x100
    Image.new("RGB", (100, 60), (10, 200, 30)).save(root / "images" / "o.jpg", exif=exif)
    displayed = [{"id": 1, "data": {"image": "images/o.jpg"},
                  "annotations": [annotation([rect(10, 10, 20, 20, "zebra", (60, 100))])]}]
    assert ingest(cfg_for(write_project(root, displayed), tmp_path / "ds")).images_written == 1
    stored = [{**displayed[0], "annotations": [annotation([rect(10, 10, 20, 20, "zebra", (100, 60))])]}]
    with pytest.raises(DetopsError, match="task 1: region r: original_width=100 but the image is 60 px"):
        ingest(cfg_for(write_project(root, stored), tmp_path / "ds2"))


# --------------------------------------------------------------------------- atomic output
def test_a_failing_ingest_leaves_the_existing_dataset_untouched(tmp_path):
    good = simple_project(tmp_path / "good", 6)
    out = tmp_path / "ds"
    ingest(cfg_for(good, out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    export, _ = bad_case(tmp_path, "size_mismatch")
    with pytest.raises(DetopsError):
        ingest(cfg_for(export, out))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "good", "size_mismatch"]  # no temp left

    # A successful re-run replaces the dataset as a whole (no stale files from the previous one).
    (out / "images" / "train" / "stale.jpg").write_bytes(b"x")
    ingest(cfg_for(good, out))
    assert not (out / "images" / "train" / "stale.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "good", "size_mismatch"]


# --------------------------------------------------------------------------- synthetic project
def test_synthetic_project_ingests_with_every_quirk_counted(raw_project, yolo_dataset):
    report = json.loads((yolo_dataset / REPORT_NAME).read_text())
    messiness = json.loads((raw_project / "messiness.json").read_text())
    config_names = [line.split('"')[1] for line in (raw_project / "labeling_config.xml").read_text().splitlines()
                    if "<Label " in line]
    ds = YoloDataset.load(yolo_dataset)
    assert ds.class_names == config_names
    n_tasks = len(json.loads((raw_project / "export.json").read_text()))
    assert report["tasks"] == n_tasks
    assert report["skipped_tasks"].get("no_annotations", []) == [e["task"] for e in messiness["no_annotation"]]
    assert report["cancelled_annotations_ignored"] == len(messiness["cancelled_annotation"])
    assert report["rotated_boxes"] >= len(messiness["rotated_rectangle"])
    assert report["skipped_regions"]["non_rectangle"]["tasks"] == [e["task"] for e in messiness["non_rectangle_region"]]
    written = sum(len(ds.images(s)) for s in SPLITS)
    assert written == report["images_written"] == n_tasks - len(messiness["no_annotation"])
    for s in SPLITS:
        for img in ds.images(s):
            with Image.open(img) as im:
                width, height = im.size
            for label in ds.labels(img):
                box = label.box(width, height)
                eps = 1e-3  # labels are written with 6 decimals
                assert -eps <= box.x1 < box.x2 <= width + eps and -eps <= box.y1 < box.y2 <= height + eps


# --------------------------------------------------------------------------- feedback holdout
def test_feedback_holdout_is_a_slice_never_seen_by_training(tmp_path):
    """A share of the feedback export's images (by content hash) becomes a test-only slice dataset;
    the rest of the feedback goes to train; the base export splits as before; re-ingesting holds out
    the same images."""
    base = simple_project(tmp_path / "base", 12)
    feedback = simple_project(tmp_path / "fb", 20, seed0=500)
    holdout = {"exports": [feedback], "fraction": 0.4, "out": tmp_path / "slice"}
    report = ingest(cfg_for([base, feedback], tmp_path / "ds", holdout=holdout))
    held = YoloDataset.load(tmp_path / "slice")
    assert held.splits == ("test",)
    held_stems = {p.stem.split("_", 1)[1] for p in held.images("test")}
    fb_stems = {f"img{500 + i}" for i in range(20)}
    assert held_stems and held_stems <= fb_stems  # from the feedback export only
    assert 2 <= len(held_stems) <= 14  # ~40% of 20
    splits = split_by_stem(tmp_path / "ds")
    assert not held_stems & set(splits)  # a held-out image is in no split of the training dataset
    fed = {s: v for s, v in splits.items() if s in fb_stems}
    assert len(fed) == 20 - len(held_stems) and set(fed.values()) == {"train"}
    assert {s: v for s, v in splits.items() if s not in fb_stems} == split_by_stem(
        _plain(base, tmp_path / "plain"))  # base images split exactly as without feedback
    assert any("holdout" in n for n in report.notes)
    for label in held.images("test"):
        assert held.labels(label)  # labels travel with the held-out images

    ingest(cfg_for([base, feedback], tmp_path / "ds2", holdout={**holdout, "out": tmp_path / "slice2"}))
    assert {p.name for p in YoloDataset.load(tmp_path / "slice2").images("test")} == \
        {p.name for p in held.images("test")}


def _plain(export: Path, out: Path) -> Path:
    ingest(cfg_for(export, out))
    return out


def test_holdout_must_name_an_ingested_export(tmp_path):
    base = simple_project(tmp_path / "base", 4)
    with pytest.raises(ValidationError, match="not among ingest.export"):
        cfg_for(base, tmp_path / "ds", holdout={"exports": [tmp_path / "other.json"], "out": tmp_path / "s"})


# --------------------------------------------------------------------------- background images
def background_project(root: Path) -> Path:
    """Six boxed tasks and the ways a task can say nothing: a submitted empty result (a labelled
    negative), only a classification, an empty result that was cancelled, and no annotation."""
    export = simple_project(root, 6)
    tasks = json.loads(export.read_text())
    size = (200, 120)
    choice = {"id": "ch", "type": "choices", "from_name": "quality", "to_name": "image",
              "value": {"choices": ["good"]}}
    for i, annotations in enumerate([
        [annotation([], aid=901)],  # "nothing here", submitted: a background image
        [annotation([choice], aid=902)],  # regions but no box: skipped as empty
        [annotation([], aid=903, cancelled=True)],  # skipped, not a negative
        [],  # not labelled at all
    ]):
        make_image(root / "images", f"neg{i}.jpg", size, seed=800 + i)
        tasks.append({"id": 100 + i, "data": {"image": f"/data/local-files/?d=images/neg{i}.jpg"},
                      "annotations": annotations})
    export.write_text(json.dumps(tasks))
    return export


def check_background_kept(out: Path, report) -> None:
    """Only the submitted empty annotation becomes an image, with an empty label file in its split."""
    dataset = YoloDataset.load(out)
    written = {img.stem.split("_", 1)[1]: img for s in SPLITS for img in dataset.images(s)}
    assert "neg0" in written and not {"neg1", "neg2", "neg3"} & set(written)
    assert dataset.label_path(written["neg0"]).read_text() == ""
    assert report.background_images == 1 and sum(report.background_images_per_split.values()) == 1
    assert report.background_images_per_split[written["neg0"].parent.name] == 1
    assert report.skipped_tasks == {"all_annotations_cancelled": [102], "empty": [101], "no_annotations": [103]}
    assert report.images_written == 7


def test_submitted_empty_annotation_is_a_background_image(tmp_path):
    export = background_project(tmp_path / "proj")
    check_background_kept(tmp_path / "ds", ingest(cfg_for(export, tmp_path / "ds")))
    assert json.loads((tmp_path / "ds" / REPORT_NAME).read_text())["background_images"] == 1


def test_real_photos_export_keeps_its_two_labelled_negatives(real_photos, tmp_path):
    """The real Label Studio export (128 COCO photos, two submitted with no region): every photo is
    written, the two negatives with empty label files, each label file equal to the published one."""
    result = CliRunner().invoke(app, ["ingest", "--export", str(real_photos / "export.json"), "--images-root",
                                      str(real_photos), "--labeling-config", str(real_photos / "labeling_config.xml"),
                                      "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    assert "(2 background)" in result.output
    report = json.loads((tmp_path / "ds" / REPORT_NAME).read_text())
    assert report["tasks"] == report["images_written"] == 128 and report["skipped_tasks"] == {}
    assert report["background_images"] == 2
    dataset = YoloDataset.load(tmp_path / "ds")
    empty = set()
    for split in SPLITS:
        for image in dataset.images(split):
            published = real_photos / "labels" / (image.stem.split("_", 1)[1] + ".txt")
            ours = dataset.labels(image)
            theirs = [[float(v) for v in line.split()] for line in published.read_text().splitlines()]
            assert [lb.class_id for lb in ours] == [int(t[0]) for t in theirs], image.name
            assert np.allclose([[lb.cx, lb.cy, lb.w, lb.h] for lb in ours] or np.zeros((0, 4)),
                               [t[1:] for t in theirs] or np.zeros((0, 4)), atol=2e-3), image.name
            if not ours:
                empty.add(image.name)
    assert len(empty) == 2


def test_mutant_that_drops_background_images_is_caught(tmp_path):
    from tests.mutants.own_data import ingest_drops_background

    export = background_project(tmp_path / "proj")
    with ingest_drops_background():
        report = ingest(cfg_for(export, tmp_path / "ds"))
    with pytest.raises(AssertionError):
        check_background_kept(tmp_path / "ds", report)
