"""Label Studio export(s) -> a split YOLO dataset and `ingest_report.json` (policies: docs/labeling.md).

Fatal problems (DetopsError naming the export and task): malformed JSON or schema, a task without its
image key, a missing or undecodable image, an image whose size differs from the annotation's
original_width/height, a label not in the labeling config, a non-positive box size, and a box
further outside the image than `clip_tolerance` (boxes within it are clipped). Skipped and counted:
tasks with no annotation, tasks whose annotations are all cancelled, tasks whose chosen annotation
has regions but no labeled rectangle, duplicate images, and non-rectangle regions. A task whose chosen
annotation was submitted with an empty result is a labelled negative: a background image with an
empty label file (ultralytics trains on those; they teach the model where nothing is).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from labeling.studio import (
    Annotation,
    LabelingConfig,
    Region,
    Task,
    image_name,
    load_export,
    load_labeling_config,
    resolve_image,
)
from pipelines.config.data import IngestConfig, SplitFractions
from pipelines.environment import cache_dir
from pipelines.errors import DetopsError
from pipelines.files import atomic_dir
from pipelines.images import oriented_size
from pipelines.types import SPLITS, Box, YoloDataset, YoloLabel, write_yolo_labels

REPORT_NAME = "ingest_report.json"


# --------------------------------------------------------------------------- report
class RegionSkips(BaseModel):
    count: int = 0
    tasks: list[int] = []


class SplitSummary(BaseModel):
    seed: int
    fractions: dict[str, float]
    rebalanced: list[dict[str, str]] = []  # {"image", "from", "to", "class"} for each move


class ImageEntry(BaseModel):
    """One written image: where it went and the size its annotation was made on."""

    split: str
    image: str
    task: int
    original_width: int
    original_height: int


class IngestReport(BaseModel):
    """Everything ingest decided, written as `<out>/ingest_report.json`."""

    model_config = ConfigDict(extra="forbid")

    exports: list[str]
    labeling_config: str | None
    class_order: str  # "labeling_config" or "first_seen"
    class_names: list[str]
    notes: list[str] = []
    policy: dict[str, str]
    tasks: int = 0
    tasks_used: int = 0
    multi_annotator_tasks: int = 0
    ground_truth_used: int = 0
    cancelled_annotations_ignored: int = 0
    images_written: int = 0
    images_per_split: dict[str, int] = {}
    background_images: int = 0  # submitted with an empty result: written with an empty label file
    background_images_per_split: dict[str, int] = {}
    boxes_per_class_per_split: dict[str, dict[str, int]] = {}
    rotated_boxes: int = 0
    clipped_boxes: int = 0
    skipped_tasks: dict[str, list[int]] = {}
    skipped_regions: dict[str, RegionSkips] = {}
    split: SplitSummary
    images: list[ImageEntry] = []  # read by `detops validate` to check decoded vs annotated sizes


POLICY_TEXT = {
    "latest": "the most recently updated non-cancelled annotation of each task",
    "first": "the earliest created non-cancelled annotation of each task",
}


# --------------------------------------------------------------------------- geometry
class _RectValue(BaseModel):
    model_config = ConfigDict(extra="allow")

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    rectanglelabels: list[str] = []


def rectangle_corners(x: float, y: float, width: float, height: float, rotation: float,
                      img_w: int, img_h: int) -> list[tuple[float, float]]:
    """Pixel corners of a Label Studio rectangle: percent -> pixels first, then rotate clockwise by
    `rotation` degrees about the top-left corner (Label Studio's pivot). Pixels before rotating matters
    on non-square images: rotating in percent units shears the shape."""
    x0, y0 = x / 100 * img_w, y / 100 * img_h
    w, h = width / 100 * img_w, height / 100 * img_h
    # Image y points down, so the standard rotation matrix turns clockwise on screen.
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(x0 + dx * c - dy * s, y0 + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]


def enclosing_box(corners: list[tuple[float, float]]) -> Box:
    """The axis-aligned box enclosing `corners`."""
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    return Box(min(xs), min(ys), max(xs), max(ys))


def clip_box(box: Box, img_w: int, img_h: int, tolerance: float) -> Box | None:
    """`box` clipped to the image, or None when it sticks out by more than `tolerance` of a side."""
    tx, ty = tolerance * img_w + 1e-9, tolerance * img_h + 1e-9
    if box.x1 < -tx or box.y1 < -ty or box.x2 > img_w + tx or box.y2 > img_h + ty:
        return None
    return Box(max(box.x1, 0.0), max(box.y1, 0.0), min(box.x2, float(img_w)), min(box.y2, float(img_h)))


# --------------------------------------------------------------------------- annotation policy
def _utc(moment: datetime | None) -> datetime:
    if moment is None:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def select_annotation(annotations: list[Annotation], policy: str) -> Annotation | None:
    """The annotation that labels a task: cancelled ones are ignored; ground-truth ones, if any, win;
    then `latest` takes the most recently updated, `first` the earliest created (ties: annotation id)."""
    live = [a for a in annotations if not a.was_cancelled]
    pool = [a for a in live if a.ground_truth] or live
    if not pool:
        return None
    if policy == "latest":
        return max(pool, key=lambda a: (_utc(a.touched_at), a.id or 0))
    return min(pool, key=lambda a: (_utc(a.created_at or a.updated_at), a.id or 0))


# --------------------------------------------------------------------------- splitting
def split_key(content_hash: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the image content and the seed alone."""
    return int(hashlib.sha256(f"{seed}:{content_hash}".encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(classes_of: dict[str, set[int]], fractions: SplitFractions, seed: int,
                  n_classes: int) -> tuple[dict[str, str], list[tuple[str, str, str, int]]]:
    """Split images (content hash -> class ids present) into train/val/test.

    Each image's split comes from its own hash, so adding images never moves old ones. Then, where
    possible, an image is moved so that every class is present in every split: only from a split that
    keeps at least one image of each class the moved image holds. Returns the assignment and the
    moves (image, from, to, class id)."""
    bounds = (fractions.train, fractions.train + fractions.val)
    keys = {h: split_key(h, seed) for h in classes_of}
    split = {h: SPLITS[0] if k < bounds[0] else SPLITS[1] if k < bounds[1] else SPLITS[2]
             for h, k in keys.items()}
    count = defaultdict(int)  # (class, split) -> images holding the class
    for h, classes in classes_of.items():
        for c in classes:
            count[c, split[h]] += 1
    moves: list[tuple[str, str, str, int]] = []
    changed = True
    while changed:  # each move fills an empty (class, split) cell and empties none: this terminates
        changed = False
        for c in range(n_classes):
            for target in SPLITS:
                if count[c, target]:
                    continue
                donors = sorted((d for d in SPLITS if d != target and count[c, d] >= 2),
                                key=lambda d: (-count[c, d], SPLITS.index(d)))
                for donor in donors:
                    movable = sorted((h for h in classes_of if split[h] == donor and c in classes_of[h]
                                      and all(count[k, donor] >= 2 for k in classes_of[h])), key=keys.get)
                    if movable:
                        h = movable[0]
                        for k in classes_of[h]:
                            count[k, donor] -= 1
                            count[k, target] += 1
                        split[h] = target
                        moves.append((h, donor, target, c))
                        changed = True
                        break
    return split, moves


# --------------------------------------------------------------------------- images
def _stable_name(content_hash: str, ref: str, source: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image_name(ref) or source.name).stem)[:80] or "image"
    return f"{content_hash[:12]}_{stem}{source.suffix.lower() or '.jpg'}"


@dataclass
class _Image:
    content_hash: str
    source: Path
    name: str
    labels: list[YoloLabel]
    task_id: int
    annotation: Annotation
    width: int  # as annotated (checked equal to the decoded, EXIF-oriented size)
    height: int


# --------------------------------------------------------------------------- ingest
class _Ingest:
    """One ingest run: reads tasks, keeps the chosen images and counts everything it skips."""

    def __init__(self, cfg: IngestConfig, config: LabelingConfig | None, config_path: Path | None):
        self.cfg = cfg
        self.config = config
        self.class_names = list(config.class_names) if config else []
        self.image_key = config.image_key if config else "image"
        self.report = IngestReport(
            exports=[str(p) for p in cfg.exports],
            labeling_config=str(config_path) if config_path else None,
            class_order="labeling_config" if config else "first_seen",
            class_names=[],
            policy={
                "annotator": f"{cfg.annotator_policy}: {POLICY_TEXT[cfg.annotator_policy]}",
                "ground_truth": "annotations marked ground_truth take precedence over the others",
                "cancelled": "cancelled annotations are ignored; tasks with only cancelled ones are skipped",
                "empty": "tasks without annotations, or whose annotation has regions but no labeled "
                         "rectangle, are skipped",
                "background": "an annotation submitted with an empty result is a background image (empty "
                              "label file)",
                "non_rectangle": "regions other than labeled rectangles are skipped and counted",
                "duplicates": "images with the same content are kept once, labeled by the task the "
                              "annotator policy prefers",
                "clip": f"boxes outside the image by at most {cfg.clip_tolerance:.0%} of a side are "
                        "clipped, further is an error",
            },
            split=SplitSummary(seed=cfg.seed, fractions=cfg.split.model_dump()),
        )
        if not config:
            self.report.notes.append("no labeling config: class ids follow the order labels first "
                                     "appear in the export(s)")
        self.skipped: dict[str, list[int]] = defaultdict(list)
        self.region_skips: dict[str, RegionSkips] = defaultdict(RegionSkips)
        self.images: dict[str, _Image] = {}
        self.feedback: set[str] = set()  # content hashes seen in a feedback export (cfg.holdout)

    def _skip_region(self, reason: str, task_id: int) -> None:
        entry = self.region_skips[reason]
        entry.count += 1
        if task_id not in entry.tasks:
            entry.tasks.append(task_id)

    def task(self, task: Task, where: str, root: Path, feedback: bool = False) -> None:
        """Turn one task into a kept image with its labels, or count why it is skipped. `feedback`:
        the task comes from an export of `holdout.exports`."""
        self.report.tasks += 1
        ref = task.data.get(self.image_key)
        if not isinstance(ref, str) or not ref:
            raise DetopsError(f"{where}: data has no {self.image_key!r} image reference")
        if not task.annotations:
            self.skipped["no_annotations"].append(task.id)
            return
        cancelled = sum(a.was_cancelled for a in task.annotations)
        self.report.cancelled_annotations_ignored += cancelled
        if len(task.annotations) - cancelled > 1:
            self.report.multi_annotator_tasks += 1
        annotation = select_annotation(task.annotations, self.cfg.annotator_policy)
        if annotation is None:
            self.skipped["all_annotations_cancelled"].append(task.id)
            return
        rects = [r for r in annotation.result if self._is_box(r, task.id)]
        if annotation.result and not rects:  # regions, none a labeled box: not a statement of "nothing here"
            self.skipped["empty"].append(task.id)
            return

        try:
            source = resolve_image(ref, root, cache_dir() / "ingest-http", self.cfg.http_timeout_s)
            width, height = oriented_size(source)
        except DetopsError as exc:
            raise DetopsError(f"{where}: {exc}") from None
        labels = [label for region in rects for label in self._labels(region, width, height, where)]
        content_hash = hashlib.sha256(source.read_bytes()).hexdigest()
        if feedback:
            self.feedback.add(content_hash)
        image = _Image(content_hash, source, _stable_name(content_hash, ref, source), labels, task.id, annotation,
                       width, height)
        kept = self.images.get(content_hash)
        if kept is not None:
            winner = select_annotation([kept.annotation, annotation], self.cfg.annotator_policy)
            loser = image if winner is kept.annotation else kept
            self.skipped["duplicate_image"].append(loser.task_id)
            if loser is kept:
                self.images[content_hash] = image
            return
        self.images[content_hash] = image

    def _is_box(self, region: Region, task_id: int) -> bool:
        if region.type == "rectanglelabels" and region.value.get("rectanglelabels"):
            return True
        reason = "unlabeled_rectangle" if region.type in ("rectangle", "rectanglelabels") else "non_rectangle"
        self._skip_region(reason, task_id)
        return False

    def _labels(self, region: Region, width: int, height: int, where: str) -> list[YoloLabel]:
        try:
            value = _RectValue.model_validate(region.value)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise DetopsError(f"{where}: region {region.model_extra.get('id', '?')}: value."
                              f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        rid = f"{where}: region {region.model_extra.get('id', '?')}"
        for axis, original, actual in (("width", region.original_width, width),
                                       ("height", region.original_height, height)):
            if original is not None and original != actual:
                raise DetopsError(f"{rid}: original_{axis}={original} but the image is {actual} px "
                                  f"({width}x{height} after EXIF orientation)")
        if value.width <= 0 or value.height <= 0:
            raise DetopsError(f"{rid}: non-positive size (width={value.width:g}%, height={value.height:g}%)")
        corners = rectangle_corners(value.x, value.y, value.width, value.height, value.rotation, width, height)
        raw = enclosing_box(corners)
        box = clip_box(raw, width, height, self.cfg.clip_tolerance)
        if box is None:
            raise DetopsError(f"{rid}: box out of the image (x={value.x:g}%, y={value.y:g}%, "
                              f"width={value.width:g}%, height={value.height:g}%, rotation={value.rotation:g})")
        if box != raw:
            self.report.clipped_boxes += 1
        if value.rotation % 360:
            self.report.rotated_boxes += 1
        labels = []
        for name in value.rectanglelabels:
            if name not in self.class_names:
                if self.config is not None:
                    raise DetopsError(f"{rid}: label {name!r} is not in the labeling config "
                                      f"({', '.join(self.class_names)})")
                self.class_names.append(name)
            labels.append(YoloLabel(self.class_names.index(name), *box.to_yolo(width, height)))
        return labels

    def write(self, root: Path, to_train: set[str] = frozenset()) -> None:
        """Split the kept images and write the dataset and the report under `root`; the images of
        `to_train` go to train whatever their hash says."""
        n_classes = len(self.class_names)
        classes_of = {h: {lb.class_id for lb in img.labels} for h, img in self.images.items() if h not in to_train}
        split, moves = assign_splits(classes_of, self.cfg.split, self.cfg.seed, n_classes)
        split |= {h: SPLITS[0] for h in to_train if h in self.images}
        dataset = YoloDataset(root=root, class_names=self.class_names)
        dataset.write_yaml()
        boxes = {s: {name: 0 for name in self.class_names} for s in SPLITS}
        for s in SPLITS:
            dataset.image_dir(s).mkdir(parents=True, exist_ok=True)
            dataset.label_dir(s).mkdir(parents=True, exist_ok=True)
        for h in sorted(self.images, key=lambda h: self.images[h].name):
            image = self.images[h]
            target = dataset.image_dir(split[h]) / image.name
            shutil.copyfile(image.source, target)
            write_yolo_labels(dataset.label_path(target), image.labels)
            self.report.images.append(ImageEntry(split=split[h], image=image.name, task=image.task_id,
                                                 original_width=image.width, original_height=image.height))
            for label in image.labels:
                boxes[split[h]][self.class_names[label.class_id]] += 1
        report = self.report
        report.class_names = self.class_names
        report.tasks_used = len(self.images)
        report.ground_truth_used = sum(img.annotation.ground_truth for img in self.images.values())
        report.images_written = len(self.images)
        report.images_per_split = {s: sum(v == s for v in split.values()) for s in SPLITS}
        background = [h for h, image in self.images.items() if not image.labels]
        report.background_images = len(background)
        report.background_images_per_split = {s: sum(split[h] == s for h in background) for s in SPLITS}
        report.boxes_per_class_per_split = boxes
        report.skipped_tasks = {k: sorted(v) for k, v in sorted(self.skipped.items())}
        report.skipped_regions = dict(sorted(self.region_skips.items()))
        report.split.rebalanced = [{"image": self.images[h].name, "from": a, "to": b,
                                    "class": self.class_names[c]} for h, a, b, c in moves]
        (root / REPORT_NAME).write_text(report.model_dump_json(indent=2))


def _labeling_config(cfg: IngestConfig) -> tuple[LabelingConfig | None, Path | None]:
    path = cfg.labeling_config_file
    return (load_labeling_config(path), path) if path is not None else (None, None)


def ingest(cfg: IngestConfig) -> IngestReport:
    """Convert the Label Studio export(s) of `cfg` into a YOLO dataset in `cfg.out` (replaced
    atomically: on any error an existing `cfg.out` is left as it was) and return the report."""
    from rich.progress import track

    config, config_path = _labeling_config(cfg)
    run = _Ingest(cfg, config, config_path)
    loaded = [(path, load_export(path)) for path in cfg.exports]
    feedback_exports = set(cfg.holdout.exports) if cfg.holdout else set()
    work = [(task, f"{path}: task {task.id}", cfg.images_root or path.parent, path in feedback_exports)
            for path, tasks in loaded for task in tasks]
    for task, where, root, feedback in track(work, description="ingest tasks", transient=True):
        run.task(task, where, root, feedback)
    if not run.images:
        raise DetopsError(f"{', '.join(map(str, cfg.exports))}: no usable labeled image "
                          f"(skipped: {json.dumps({k: len(v) for k, v in run.skipped.items()})})")

    to_train: set[str] = set()
    if cfg.holdout is not None:
        held = {h: run.images.pop(h) for h in sorted(run.feedback)
                if h in run.images and holdout_key(h, cfg.seed) < cfg.holdout.fraction}
        if not held:
            raise DetopsError(f"ingest.holdout: no image of {', '.join(map(str, cfg.holdout.exports))} was held "
                              f"out (fraction {cfg.holdout.fraction}): label more images or raise the fraction")
        # The rest of the feedback goes to train: the base splits keep judging the base distribution,
        # and the held-out slice judges the new one.
        to_train = run.feedback & set(run.images)
        run.report.notes.append(f"holdout: {len(held)} feedback images held out to {cfg.holdout.out} (an "
                                f"evaluation slice), {len(to_train)} to train")
        with atomic_dir(Path(cfg.holdout.out)) as tmp:
            write_slice(tmp, held, run.class_names)
    with atomic_dir(Path(cfg.out)) as tmp:
        run.write(tmp, to_train)
    return run.report


def holdout_key(content_hash: str, seed: int) -> float:
    """A uniform number in [0, 1) per image, independent of `split_key` (another salt): images below
    `holdout.fraction` are held out."""
    return split_key(f"holdout:{content_hash}", seed)


def write_slice(root: Path, images: dict[str, _Image], class_names: list[str]) -> None:
    """A YOLO dataset with every image of `images` in its test split (an evaluation slice)."""
    dataset = YoloDataset(root=root, class_names=class_names, splits=("test",))
    dataset.write_yaml()
    dataset.image_dir("test").mkdir(parents=True)
    dataset.label_dir("test").mkdir(parents=True)
    for image in sorted(images.values(), key=lambda i: i.name):
        target = dataset.image_dir("test") / image.name
        shutil.copyfile(image.source, target)
        write_yolo_labels(dataset.label_path(target), image.labels)
    (root / "slice.json").write_text(json.dumps({"images": sorted(i.name for i in images.values()),
                                                 "content_hashes": sorted(images)}, indent=1) + "\n")
