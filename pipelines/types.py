"""Detection types shared by every stage: boxes, detections and the YOLO dataset format on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in pixels of the original image: (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @classmethod
    def from_yolo(cls, cx: float, cy: float, w: float, h: float, img_w: int, img_h: int) -> Box:
        """From normalized centre/size (YOLO label format) to pixels."""
        return cls((cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h)

    def to_yolo(self, img_w: int, img_h: int) -> tuple[float, float, float, float]:
        """Normalized (cx, cy, w, h)."""
        return (
            (self.x1 + self.x2) / 2 / img_w,
            (self.y1 + self.y2) / 2 / img_h,
            self.width / img_w,
            self.height / img_h,
        )

    def to_xywh(self) -> list[float]:
        """COCO's [x, y, width, height]."""
        return [self.x1, self.y1, self.width, self.height]

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object. `confidence` is calibrated when the model has a calibrator, else raw."""

    box: Box
    class_id: int
    confidence: float
    raw_confidence: float


@dataclass(frozen=True, slots=True)
class YoloLabel:
    """One line of a YOLO label file: class id and normalized centre/size."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float

    def to_line(self) -> str:
        return f"{self.class_id} {self.cx:.6f} {self.cy:.6f} {self.w:.6f} {self.h:.6f}"

    def box(self, img_w: int, img_h: int) -> Box:
        return Box.from_yolo(self.cx, self.cy, self.w, self.h, img_w, img_h)


def read_yolo_labels(path: Path) -> list[YoloLabel]:
    """Read a YOLO label file; a missing file means an image with no objects."""
    if not path.exists():
        return []
    labels = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts:
            labels.append(YoloLabel(int(parts[0]), *(float(v) for v in parts[1:5])))
    return labels


def write_yolo_labels(path: Path, labels: list[YoloLabel]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(label.to_line() + "\n" for label in labels))


@dataclass
class YoloDataset:
    """A dataset in the layout ultralytics reads: `dataset.yaml`, `images/<split>/`, `labels/<split>/`."""

    root: Path
    class_names: list[str]
    splits: tuple[str, ...] = field(default=SPLITS)

    @property
    def yaml_path(self) -> Path:
        return self.root / "dataset.yaml"

    @classmethod
    def load(cls, root: Path | str) -> YoloDataset:
        from pipelines.errors import DetopsError

        root = Path(root)
        yaml_path = root / "dataset.yaml"
        if not yaml_path.exists():
            raise DetopsError(f"{root}: not a YOLO dataset (no dataset.yaml)")
        try:
            spec = yaml.safe_load(yaml_path.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            raise DetopsError(f"{yaml_path}: unreadable ({exc.__class__.__name__}: {' '.join(str(exc).split())})") from None
        if not isinstance(spec, dict):
            raise DetopsError(f"{yaml_path}: expected a mapping, got {type(spec).__name__}")
        names = spec.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DetopsError(f"{yaml_path}: 'names' must be a non-empty list (or id mapping) of class names")
        splits = tuple(s for s in SPLITS if s in spec)
        return cls(root=root, class_names=list(names), splits=splits)

    def write_yaml(self) -> None:
        # No `path` key: ultralytics then resolves the split folders against this file's folder.
        spec = {**{s: f"images/{s}" for s in self.splits},
                "nc": len(self.class_names), "names": dict(enumerate(self.class_names))}
        self.root.mkdir(parents=True, exist_ok=True)
        self.yaml_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    def image_dir(self, split: str) -> Path:
        return self.root / "images" / split

    def label_dir(self, split: str) -> Path:
        return self.root / "labels" / split

    def images(self, split: str) -> list[Path]:
        folder = self.image_dir(split)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def label_path(self, image_path: Path) -> Path:
        """The label file of an image: same stem, under labels/<split>/."""
        split = image_path.parent.name
        return self.label_dir(split) / (image_path.stem + ".txt")

    def labels(self, image_path: Path) -> list[YoloLabel]:
        return read_yolo_labels(self.label_path(image_path))
