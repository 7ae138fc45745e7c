"""`detops augment`: an augmented copy of a YOLO dataset, built with a bbox-safe albumentations pipeline.

Only the train split is augmented: the output holds every train image, ``copies`` augmented versions of
each (``<stem>_aug<k>``), and val/test exactly as they were (hard links where the file system allows),
so that evaluation never sees augmented data. The transforms come from params.yaml by albumentations
class name. Each augmented image is seeded from (seed, image name, k), so the output does not depend
on the order in which images are processed. The output folder is replaced atomically.

Box rules (``bbox_rule``), after the transforms moved the boxes:

- ``clip``: a box partly outside the image is clipped to it and kept when at least ``min_visibility`` of
  its area is still inside;
- ``drop``: a box is kept only when at least ``1 - DROP_TOLERANCE`` (95 %) of its area is inside (and at
  least ``min_visibility``); boxes cut further by the border are dropped, never clipped to a fragment.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config.data import AugmentConfig
from pipelines.errors import DetopsError
from pipelines.files import atomic_dir
from pipelines.images import read_rgb
from pipelines.types import SPLITS, YoloDataset, YoloLabel, write_yolo_labels

DROP_TOLERANCE = 0.05  # share of a box's area that may fall outside the image under bbox_rule "drop"
PREVIEW_TILES = 16  # a 4x4 grid
TILE_PX = 256
_PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207),
            (10, 249, 72), (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0)]  # BGR


@dataclass
class AugmentSummary:
    """What `augment` wrote; also saved as ``<report>/augment.json`` (a DVC metrics file)."""

    out: str
    train_images: int
    augmented_images: int
    val_images: int
    test_images: int
    boxes_in: int  # boxes of the train images that were augmented, once per copy
    boxes_out: int  # boxes in the augmented copies
    boxes_dropped: int
    seconds: float
    preview: str


def build_pipeline(cfg: AugmentConfig) -> Any:
    """The albumentations Compose of ``cfg.transforms`` with YOLO-format, bbox-safe parameters."""
    import albumentations as A
    from albumentations.core.type_definitions import Targets

    transforms = []
    for i, spec in enumerate(cfg.transforms):
        where = f"augment.transforms[{i}] {spec.name}"
        cls = getattr(A, spec.name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise DetopsError(f"{where}: not an albumentations transform")
        if not issubclass(cls, A.ImageOnlyTransform) and Targets.BBOXES not in cls._targets:
            raise DetopsError(f"{where}: does not support bounding boxes")
        try:
            # strict: an unknown argument is an error, not a warning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation chatter of some transforms
                transforms.append(cls(p=spec.p, strict=True, **spec.args))
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            reason = " ".join(str(exc).split())
            raise DetopsError(f"{where}: bad args {spec.args}: {reason}") from None
    min_visibility = cfg.min_visibility if cfg.bbox_rule == "clip" else max(cfg.min_visibility,
                                                                            1 - DROP_TOLERANCE)
    bbox_params = A.BboxParams(format="yolo", label_fields=["class_ids"], clip=True,
                               filter_invalid_bboxes=True, min_visibility=min_visibility)
    return A.Compose(transforms, bbox_params=bbox_params, seed=cfg.seed)


def image_seed(seed: int, name: str, k: int) -> int:
    """The seed of augmented copy `k` of image `name`: independent of processing order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{k}".encode()).digest()[:8], "little")


def augment_image(pipeline: Any, image: Any, labels: list[YoloLabel],
                  seed: int) -> tuple[Any, list[YoloLabel]]:
    """One augmented copy of an RGB image and its labels, drawn from `seed`."""
    import numpy as np

    # Compose.set_random_seed gives every transform the same seed, so two transforms with the same p
    # would always fire together; one shared generator draws their decisions independently.
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    result = pipeline(image=image, bboxes=[[lb.cx, lb.cy, lb.w, lb.h] for lb in labels],
                      class_ids=[lb.class_id for lb in labels])
    out = [YoloLabel(int(c), *(min(max(float(v), 0.0), 1.0) for v in box))
           for box, c in zip(result["bboxes"], result["class_ids"])]
    return result["image"], out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def draw_labels(image_bgr: Any, labels: list[YoloLabel], names: list[str]) -> Any:
    """A copy of the image with each box and its class name drawn on it."""
    import cv2

    img = image_bgr.copy()
    h, w = img.shape[:2]
    for label in labels:
        box = label.box(w, h)
        color = _PALETTE[label.class_id % len(_PALETTE)]
        p1, p2 = (int(round(box.x1)), int(round(box.y1))), (int(round(box.x2)), int(round(box.y2)))
        cv2.rectangle(img, p1, p2, color, 1)
        text = names[label.class_id] if label.class_id < len(names) else str(label.class_id)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
        top = max(p1[1] - th - 3, 0)
        cv2.rectangle(img, (p1[0], top), (p1[0] + tw + 2, top + th + 3), color, -1)
        cv2.putText(img, text, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return img


def write_preview(path: Path, samples: list[tuple[str, Any, list[YoloLabel]]], names: list[str]) -> None:
    """A 4x4 grid of (name, RGB image, labels): each image fitted in a tile, boxes drawn after resizing
    so that lines stay one pixel wide."""
    import cv2
    import numpy as np

    cols = 4
    rows = max(1, -(-len(samples) // cols))
    grid = np.full((rows * TILE_PX, cols * TILE_PX, 3), 40, dtype=np.uint8)
    for i, (name, rgb, labels) in enumerate(samples):
        h, w = rgb.shape[:2]
        scale = min((TILE_PX - 16) / w, (TILE_PX - 16) / h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        tile = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), size, interpolation=cv2.INTER_AREA)
        tile = draw_labels(tile, labels, names)
        y, x = (i // cols) * TILE_PX, (i % cols) * TILE_PX
        grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        caption = name if len(name) <= 38 else ".." + name[-36:]  # what fits under a tile
        cv2.putText(grid, caption, (x + 2, y + TILE_PX - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (230, 230, 230), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise DetopsError(f"{path}: cannot write the preview")


def _preview_picks(train: list[Path], copies: int) -> set[tuple[str, int]]:
    """Up to 16 (image name, copy) pairs spread over the train split; originals (copy 0) if no copies."""
    pairs = [(p.name, k) for p in train for k in (range(1, copies + 1) if copies else [0])]
    if len(pairs) <= PREVIEW_TILES:
        return set(pairs)
    # Evenly spaced over all pairs (not a fixed step, which could land on one copy number only).
    return {pairs[round(i * (len(pairs) - 1) / (PREVIEW_TILES - 1))] for i in range(PREVIEW_TILES)}


def _write_dataset(cfg: AugmentConfig, pipeline: Any, source: YoloDataset,
                   root: Path) -> tuple[AugmentSummary, list[tuple[str, Any, list[YoloLabel]]]]:
    import cv2
    from rich.progress import track

    target = YoloDataset(root=root, class_names=source.class_names, splits=source.splits)
    target.write_yaml()
    # Whatever else ingest left next to the dataset (ingest_report.json, ...) travels with it.
    for extra in source.root.iterdir():
        if extra.is_file() and extra.name != source.yaml_path.name:
            shutil.copy2(extra, root / extra.name)
    counts = {s: 0 for s in SPLITS}
    for split in source.splits:
        target.image_dir(split).mkdir(parents=True, exist_ok=True)
        target.label_dir(split).mkdir(parents=True, exist_ok=True)
        if split == "train":
            continue
        for image in source.images(split):
            copied = target.image_dir(split) / image.name
            _link_or_copy(image, copied)
            if source.label_path(image).exists():
                _link_or_copy(source.label_path(image), target.label_path(copied))
            counts[split] += 1

    train = source.images("train") if "train" in source.splits else []
    picks = _preview_picks(train, cfg.copies)
    samples = []
    boxes_in = boxes_out = augmented = 0
    for image in track(train, description=f"augment train x{cfg.copies}", transient=True):
        try:
            labels = source.labels(image)
        except (ValueError, TypeError) as exc:  # a malformed line
            raise DetopsError(f"{source.label_path(image)}: not a YOLO label file ({exc}); "
                              "run `detops validate` first") from None
        out_image = target.image_dir("train") / image.name
        _link_or_copy(image, out_image)
        if source.label_path(image).exists():
            _link_or_copy(source.label_path(image), target.label_path(out_image))
        rgb = read_rgb(image) if cfg.copies or (image.name, 0) in picks else None
        if (image.name, 0) in picks:
            samples.append((image.name, rgb, labels))
        for k in range(1, cfg.copies + 1):
            aug, aug_labels = augment_image(pipeline, rgb, labels, image_seed(cfg.seed, image.name, k))
            path = target.image_dir("train") / f"{image.stem}_aug{k}{image.suffix}"
            if not cv2.imwrite(str(path), cv2.cvtColor(aug, cv2.COLOR_RGB2BGR)):
                raise DetopsError(f"{path}: cannot write the augmented image")
            write_yolo_labels(target.label_path(path), aug_labels)
            boxes_in += len(labels)
            boxes_out += len(aug_labels)
            augmented += 1
            if (image.name, k) in picks:
                samples.append((path.name, aug, aug_labels))
    summary = AugmentSummary(
        out=str(cfg.out), train_images=len(train), augmented_images=augmented, val_images=counts["val"],
        test_images=counts["test"], boxes_in=boxes_in, boxes_out=boxes_out,
        boxes_dropped=boxes_in - boxes_out, seconds=0.0, preview=str(cfg.report / "preview.png"),
    )
    return summary, samples


def augment(cfg: AugmentConfig) -> AugmentSummary:
    """Write ``cfg.out``: train originals + augmented copies, val/test untouched; and the preview grid
    and ``augment.json`` under ``cfg.report``. An existing ``cfg.out`` is replaced only on success."""
    start = time.perf_counter()
    source = YoloDataset.load(cfg.dataset)
    if Path(cfg.out).resolve() == source.root.resolve():
        raise DetopsError(f"augment.out ({cfg.out}) must differ from augment.dataset")
    pipeline = build_pipeline(cfg)  # a bad transform list is refused before any file is written
    with atomic_dir(Path(cfg.out)) as tmp:
        summary, samples = _write_dataset(cfg, pipeline, source, tmp)
    write_preview(cfg.report / "preview.png", samples, source.class_names)
    summary.seconds = round(time.perf_counter() - start, 2)
    (cfg.report / "augment.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
