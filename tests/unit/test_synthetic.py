"""The synthetic Label Studio project: format, determinism, messiness, tight boxes, drift shifts, CLI."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from labeling.synthetic import MESSINESS_CASES, labeling_config_xml, load_ground_truth, render, synthesize
from pipelines.config.base import load_section, override
from pipelines.config.data import SynthesizeConfig
from pipelines.errors import DetopsError

SMALL = dict(n_images=20, seed=5, min_side=96, max_side=160)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(SynthesizeConfig(out=tmp_path_factory.mktemp("synthetic"), **SMALL))


def _tasks(root: Path) -> list[dict]:
    return json.loads((root / "export.json").read_text())


def _image_file(root: Path, ref: str) -> Path:
    """Resolve a task's image reference the way Label Studio storage does (local-files or upload)."""
    if ref.startswith("/data/local-files/?d="):
        return root / ref.removeprefix("/data/local-files/?d=")
    assert ref.startswith("/data/upload/1/"), ref
    return root / "images" / ref.rsplit("/", 1)[1]


def _rotated_corners(value: dict, width: int, height: int) -> np.ndarray:
    """Corners of a Label Studio rectangle: turned clockwise about its top-left corner, in pixels."""
    x, y = value["x"] * width / 100, value["y"] * height / 100
    w, h = value["width"] * width / 100, value["height"] * height / 100
    t = math.radians(value["rotation"])
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return np.array([x, y]) + np.array([[0, 0], [w, 0], [w, h], [0, h]]) @ rot.T


def test_same_seed_same_bytes_other_seed_differs(project: Path, tmp_path: Path) -> None:
    again = synthesize(SynthesizeConfig(out=tmp_path / "again", **SMALL))
    files = sorted(p.relative_to(project) for p in project.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (project / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = synthesize(SynthesizeConfig(out=tmp_path / "other", **{**SMALL, "seed": 6}))
    assert (other / "export.json").read_bytes() != (project / "export.json").read_bytes()
    ours = {p.read_bytes() for p in (project / "images").iterdir()}
    assert not ours & {p.read_bytes() for p in (other / "images").iterdir()}


def test_export_is_a_label_studio_export(project: Path) -> None:
    tasks = _tasks(project)
    truth = load_ground_truth(project)
    assert [t["id"] for t in tasks] == list(range(1, SMALL["n_images"] + 1))
    assert len(list((project / "images").glob("*.jpg"))) == SMALL["n_images"]
    forms = set()
    for task in tasks:
        assert {"id", "data", "annotations", "predictions", "meta", "created_at", "updated_at", "project"} <= set(task)
        ref = task["data"]["image"]
        forms.add(ref.split("/")[2])
        image = cv2.imread(str(_image_file(project, ref)))
        assert image is not None, ref
        height, width = image.shape[:2]
        name = ref.rsplit("/", 1)[1]
        assert (truth[name].width, truth[name].height) == (width, height)
        for ann in task["annotations"]:
            assert {"id", "completed_by", "result", "was_cancelled", "ground_truth", "created_at", "updated_at",
                    "lead_time", "task", "project"} <= set(ann)
            assert ann["task"] == task["id"]
            for region in ann["result"]:
                assert {"id", "type", "from_name", "to_name", "original_width", "original_height",
                        "image_rotation", "origin", "value"} <= set(region)
                assert (region["original_width"], region["original_height"]) == (width, height)
                value = region["value"]
                if region["type"] == "rectanglelabels":
                    assert region["from_name"] == "label" and region["to_name"] == "image"
                    assert value["rectanglelabels"][0] in SynthesizeConfig().classes
                    for key in ("x", "y", "width", "height"):
                        assert 0 <= value[key] <= 100, (key, value)
                    corners = _rotated_corners(value, 100, 100)
                    assert corners.min() >= -1e-9 and corners.max() <= 100 + 1e-9, value
    assert forms == {"local-files", "upload"}


def test_label_studio_converter_reads_the_export(project: Path, tmp_path: Path) -> None:
    """The Label Studio SDK's own converter accepts the export and finds every valid rectangle."""
    from label_studio_sdk.converter import Converter

    converter = Converter(config=str(project / "labeling_config.xml"), project_dir=str(project),
                          download_resources=False)
    converter.convert_to_yolo(str(project / "export.json"), str(tmp_path / "yolo"), is_dir=False)
    labels = list((tmp_path / "yolo/labels").glob("*.txt"))
    lines = sum(len(p.read_text().splitlines()) for p in labels)
    # The converter writes one file per annotation (the last one wins); count the rectangles it keeps.
    assert len(labels) == SMALL["n_images"]
    assert lines > SMALL["n_images"]


def test_labeling_config_lists_classes_in_config_order(project: Path) -> None:
    classes = ["star", "square", "circle"]
    view = ET.fromstring(labeling_config_xml(classes))
    assert view.tag == "View"
    assert view.find("Image").attrib == {"name": "image", "value": "$image"}
    control = view.find("RectangleLabels")
    assert control.attrib == {"name": "label", "toName": "image"}
    assert [label.attrib["value"] for label in control] == classes
    assert all(label.attrib["background"].startswith("#") for label in control)
    written = ET.parse(project / "labeling_config.xml").getroot().find("RectangleLabels")
    assert [label.attrib["value"] for label in written] == ["square", "circle", "triangle", "star"]


def test_messiness_cases_are_present_and_as_documented(project: Path) -> None:
    tasks = {t["id"]: t for t in _tasks(project)}
    listed = json.loads((project / "messiness.json").read_text())
    assert set(listed) == set(MESSINESS_CASES) and all(len(v) == 1 for v in listed.values())
    truth = load_ground_truth(project)

    def task_of(case: str) -> dict:
        task = tasks[listed[case][0]["task"]]
        assert task["meta"]["messiness"] == case
        return task

    second = task_of("second_annotator")["annotations"]
    assert len(second) == 2 and second[0]["completed_by"] != second[1]["completed_by"]
    assert second[1]["updated_at"] > second[0]["updated_at"]
    boxes = [[tuple(r["value"][k] for k in ("x", "y", "width", "height")) for r in a["result"]] for a in second]
    assert boxes[0] != boxes[1] and len(boxes[0]) == len(boxes[1])
    assert np.abs(np.array(boxes[0]) - np.array(boxes[1])).max() < 10  # percent: slightly different

    cancelled = task_of("cancelled_annotation")["annotations"]
    assert sorted(a["was_cancelled"] for a in cancelled) == [False, True]

    result = task_of("non_rectangle_region")["annotations"][0]["result"]
    assert {"polygonlabels", "keypointlabels"} <= {r["type"] for r in result}

    empty = task_of("no_annotation")
    assert empty["annotations"] == [] and empty["total_annotations"] == 0
    name = empty["data"]["image"].rsplit("/", 1)[1]
    assert truth[name].objects, "the unannotated image still has objects"

    rotated_task = task_of("rotated_rectangle")
    name = rotated_task["data"]["image"].rsplit("/", 1)[1]
    image = cv2.imread(str(project / "images" / name))
    height, width = image.shape[:2]
    regions = [r for r in rotated_task["annotations"][0]["result"] if r["value"]["rotation"] != 0]
    assert len(regions) == 1
    corners = _rotated_corners(regions[0]["value"], width, height)
    # The enclosing axis-aligned box of the rotated region is the ground-truth box ...
    gt = [o.box for o in truth[name].objects if o.rotation]
    assert len(gt) == 1
    assert np.allclose([*corners.min(axis=0), *corners.max(axis=0)], [gt[0].x1, gt[0].y1, gt[0].x2, gt[0].y2],
                       atol=0.01)
    # ... and the image really holds a red rectangle turned that way (it is the last one drawn).
    region_mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(region_mask, [np.round(corners - 0.5).astype(np.int32)], 1)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(int)
    red = (np.minimum(hsv[..., 0], 180 - hsv[..., 0]) <= 12) & (hsv[..., 1] > 90)
    inside = red[region_mask == 1].mean()
    # The corners of the enclosing box outside the turned rectangle are not red.
    gt_mask = np.zeros((height, width), bool)
    gt_mask[int(gt[0].y1) + 1:int(gt[0].y2) - 1, int(gt[0].x1) + 1:int(gt[0].x2) - 1] = True
    corners_outside = red[gt_mask & (region_mask == 0)].mean()
    assert inside > 0.9, inside
    assert corners_outside < 0.3, corners_outside


def test_boxes_are_tight_to_the_drawn_object() -> None:
    """The last-drawn object is never occluded: the pixels of its colour near its box span the box."""
    cfg = SynthesizeConfig(n_images=40, seed=3, min_side=96, max_side=160, messy=False)
    errors = []
    for index in range(cfg.n_images):
        sample = render(cfg, index)
        shape, obj = sample.shapes[-1], sample.truth.objects[-1]
        box = obj.box
        if any(o.label == obj.label and o.box.x1 < box.x2 + 5 and o.box.x2 > box.x1 - 5
               and o.box.y1 < box.y2 + 5 and o.box.y2 > box.y1 - 5 for o in sample.truth.objects[:-1]):
            continue  # a same-coloured neighbour within 5 px would blur the measurement
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_BGR2HSV).astype(int)
        hue = int(cv2.cvtColor(np.uint8([[shape.bgr]]), cv2.COLOR_BGR2HSV)[0, 0, 0])
        dh = np.abs(hsv[..., 0] - hue)
        mask = (np.minimum(dh, 180 - dh) <= 12) & (hsv[..., 1] > 90)
        window = np.zeros_like(mask)
        window[max(int(box.y1) - 4, 0):int(box.y2) + 5, max(int(box.x1) - 4, 0):int(box.x2) + 5] = True
        ys, xs = np.nonzero(mask & window)
        errors.append(max(abs(xs.min() - box.x1), abs(xs.max() + 1 - box.x2),
                          abs(ys.min() - box.y1), abs(ys.max() + 1 - box.y2)))
    errors = np.array(errors)
    assert len(errors) >= 25
    # Anti-aliased edges and sensor noise move the colour mask by a pixel or two; a loose or shifted box
    # moves every measurement. A few objects sit next to background or clutter of a similar colour.
    assert np.median(errors) <= 2.0 and np.mean(errors <= 2.5) >= 0.85, np.round(errors, 1)


def test_ground_truth_matches_export(project: Path) -> None:
    truth = load_ground_truth(project)
    for task in _tasks(project):
        name = task["data"]["image"].rsplit("/", 1)[1]
        valid = [a for a in task["annotations"] if not a["was_cancelled"]]
        if not valid:
            continue
        latest = max(valid, key=lambda a: a["updated_at"])
        rects = [r for r in latest["result"] if r["type"] == "rectanglelabels"]
        t = truth[name]
        objects = [o for o in t.objects if o.in_label_set]
        assert [r["value"]["rectanglelabels"][0] for r in rects] == [o.label for o in objects]
        for region, obj in zip(rects, objects):
            corners = _rotated_corners(region["value"], t.width, t.height)
            assert np.allclose([*corners.min(axis=0), *corners.max(axis=0)],
                               [obj.box.x1, obj.box.y1, obj.box.x2, obj.box.y2], atol=0.01)


def _shifted(shift: str | None, n: int = 8) -> list:
    cfg = SynthesizeConfig(n_images=n, seed=11, min_side=96, max_side=160, shift=shift, messy=False)
    return [render(cfg, i) for i in range(n)]


def _laplacian_var(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())


def test_shifts_change_their_statistic() -> None:
    base = _shifted(None)
    dark, night, blur, gray, background = (_shifted(s) for s in ("dark", "night", "blur", "gray", "background"))
    for b, d, n, bl, g, bg in zip(base, dark, night, blur, gray, background):
        # Same objects: these shifts change only the photometry or the background.
        assert b.truth == d.truth == n.truth == bl.truth == g.truth == bg.truth
        assert d.image.mean() < 0.5 * b.image.mean()
        assert n.image.mean() < 0.5 * d.image.mean()
        assert np.array_equal(g.image[..., 0], g.image[..., 1]) and np.array_equal(g.image[..., 1], g.image[..., 2])
        assert not np.array_equal(b.image[..., 0], b.image[..., 2])
        assert _laplacian_var(bl.image) < 0.5 * _laplacian_var(b.image)
        assert not np.array_equal(bg.image, b.image)

    def background_step_edges(samples: list) -> float:
        """Share of background pixels on a hard step edge: checkerboards have many, the smooth noise,
        gradients, sine stripes and blurred blotches in distribution few."""
        scores = []
        for s in samples:
            gray = cv2.cvtColor(s.image, cv2.COLOR_BGR2GRAY).astype(np.float32)
            keep = np.ones(gray.shape, bool)
            for o in s.truth.objects:
                keep[int(o.box.y1):int(math.ceil(o.box.y2)), int(o.box.x1):int(math.ceil(o.box.x2))] = False
            gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
            edges = np.hypot(gx, gy)[keep]
            scores.append(float(np.mean(edges > 120)))
        return float(np.mean(scores))

    assert background_step_edges(background) > 3 * background_step_edges(base)

    def size_share(samples: list) -> float:
        sides = [max(o.box.width, o.box.height) / min(s.truth.width, s.truth.height)
                 for s in samples for o in s.truth.objects]
        return float(np.mean([(side < 0.055) or (side > 0.5) for side in sides]))

    assert size_share(base) < 0.1
    assert size_share(_shifted("scale")) > 0.6


def test_unseen_class_is_drawn_but_not_labeled(tmp_path: Path) -> None:
    root = synthesize(SynthesizeConfig(out=tmp_path, n_images=6, seed=2, min_side=96, max_side=128,
                                       shift="unseen_class", messy=False))
    truth = load_ground_truth(root)
    unseen = [o for t in truth.values() for o in t.objects if not o.in_label_set]
    assert unseen and {o.label for o in unseen} == {"hexagon"}
    for task in _tasks(root):
        name = task["data"]["image"].rsplit("/", 1)[1]
        regions = task["annotations"][0]["result"]
        assert all(r["value"]["rectanglelabels"][0] != "hexagon" for r in regions)
        assert len(regions) == sum(o.in_label_set for o in truth[name].objects)
        assert task["meta"]["unlabeled_unseen_objects"] == sum(not o.in_label_set for o in truth[name].objects)


def test_bad_configs_are_refused_in_one_line() -> None:
    with pytest.raises(DetopsError, match="unknown shape"):
        render(SynthesizeConfig(classes=["square", "pentagon"]), 0)
    with pytest.raises(DetopsError, match="synthesize.*min_side"):
        override(SynthesizeConfig(), min_side=300, max_side=200)
    with pytest.raises(DetopsError, match="synthesize.shift"):
        load_section(SynthesizeConfig, shift="foggy")
    with pytest.raises(DetopsError, match="unseen_class"):
        render(SynthesizeConfig(classes=["square", "circle", "triangle", "star", "hexagon", "cross"],
                                shift="unseen_class"), 0)


def test_cli_synthesize(tmp_path: Path) -> None:
    from pipelines.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["synthesize", "--out", str(tmp_path / "p"), "--n-images", "3", "--seed", "4",
                                 "--shift", "dark"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "p/export.json").read_text())) == 3
    assert json.loads((tmp_path / "p/ground_truth.json").read_text())["shift"] == "dark"

    bad = runner.invoke(app, ["synthesize", "--out", str(tmp_path / "q"), "--shift", "foggy"])
    assert bad.exit_code == 1
    message = bad.stderr.strip() if bad.stderr_bytes is not None else bad.output.strip()
    assert len(message.splitlines()) == 1 and "synthesize.shift" in message and "Traceback" not in message
    assert not (tmp_path / "q").exists()


# Every SIMD level numpy and OpenCV may dispatch to on x86-64 beyond the baseline: turned off, the
# generator must write the same bytes (the data was once different on AVX2 and AVX-512 machines).
_NO_SIMD = {
    "NPY_DISABLE_CPU_FEATURES": "SSSE3 SSE41 POPCNT SSE42 AVX F16C FMA3 AVX2 AVX512F AVX512CD AVX512_KNL "
                                "AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR",
    "OPENCV_CPU_DISABLE": "SSSE3,SSE4_1,POPCNT,SSE4_2,AVX,FP16,FMA3,AVX2,AVX_512F,AVX512_SKX,AVX512_ICL",
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("shift", [None, "blur", "background"])
def test_same_bytes_whatever_the_instruction_set(shift: str | None, tmp_path: Path) -> None:
    cfg = {**SMALL, "n_images": 24, "min_side": 256, "max_side": 416, "shift": shift}
    native = synthesize(SynthesizeConfig(out=tmp_path / "native", **cfg))
    script = ("import sys; from pathlib import Path; from labeling.synthetic import synthesize; "
              "from pipelines.config.data import SynthesizeConfig; "
              f"synthesize(SynthesizeConfig(out=Path(sys.argv[1]), **{cfg!r}))")
    env = {**os.environ, **_NO_SIMD, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "plain")], env=env, check=True,
                   capture_output=True, timeout=300)
    files = sorted(p.relative_to(native) for p in native.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*")
                                     if p.is_file())
    for rel in files:
        assert (native / rel).read_bytes() == (tmp_path / "plain" / rel).read_bytes(), rel
