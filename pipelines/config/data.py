"""Sections of the data stages: synthesize, ingest, validate, augment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.config.base import Section

ShiftName = Literal["dark", "night", "blur", "gray", "background", "scale", "unseen_class"]


class SynthesizeConfig(Section):
    section: ClassVar[str] = "synthesize"

    out: Path = Path("data/raw")
    n_images: int = Field(1200, ge=1)
    seed: int = 0
    classes: list[str] = ["square", "circle", "triangle", "star"]
    min_side: int = Field(256, ge=32)
    max_side: int = Field(416, ge=32)
    shift: ShiftName | None = None
    messy: bool = True  # add the realistic Label Studio messiness that ingest must handle

    @model_validator(mode="after")
    def _consistent(self) -> SynthesizeConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list without repeats (got {self.classes})")
        return self


class SplitFractions(Section):
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (got {total:g})")
        return self


class HoldoutConfig(Section):
    """The held-out part of feedback batches: a share of the images of the `exports` listed (chosen by
    content hash, so a re-ingest holds out the same ones) goes to a separate YOLO dataset `out` (all in
    its test split: an evaluation slice), never to training; the rest of those exports goes to train."""

    exports: list[Path] = Field(min_length=1)  # which of `ingest.export` are feedback batches
    fraction: float = Field(0.4, gt=0, lt=1)
    out: Path = Path("data/slices/feedback")


class IngestConfig(Section):
    section: ClassVar[str] = "ingest"

    export: Path | list[Path] = Path("data/raw/export.json")  # several: tasks merged, images deduplicated
    labeling_config: Path | None = None  # None: <export dir>/labeling_config.xml
    images_root: Path | None = None  # default: each export's own folder
    out: Path = Path("data/dataset")
    split: SplitFractions = SplitFractions()
    seed: int = 0
    annotator_policy: Literal["latest", "first"] = "latest"
    clip_tolerance: float = Field(0.01, ge=0, le=0.1)  # boxes out of the image by at most this share are clipped
    http_timeout_s: float = Field(10.0, gt=0)
    holdout: HoldoutConfig | None = None  # feedback batches: a held-out slice and the rest to train

    @model_validator(mode="after")
    def _holdout_of_exports(self) -> IngestConfig:
        if self.holdout is not None:
            unknown = [str(p) for p in self.holdout.exports if p not in self.exports]
            if unknown:
                raise ValueError(f"holdout.exports {unknown} are not among ingest.export")
        return self

    @property
    def exports(self) -> list[Path]:
        """`export` as a list."""
        return list(self.export) if isinstance(self.export, list) else [self.export]

    @property
    def labeling_config_file(self) -> Path | None:
        """The labeling config in effect: `labeling_config`, else `labeling_config.xml` beside the
        (first) export when there is one, else None (classes then follow the export)."""
        if self.labeling_config is not None:
            return self.labeling_config
        beside = self.exports[0].parent / "labeling_config.xml"
        return beside if beside.is_file() else None


class MinInstances(Section):
    """Minimum number of boxes of every class in each split (validate)."""

    train: int = Field(10, ge=0)
    val: int = Field(3, ge=0)
    test: int = Field(3, ge=0)


class BackgroundShare(Section):
    """Allowed share of background images (no box, empty label file) in the whole dataset (validate).
    ultralytics suggests 0-10 %: a few teach the model where nothing is, many starve it of objects."""

    min: float = Field(0.0, ge=0, le=1)
    max: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> BackgroundShare:
        if self.min > self.max:
            raise ValueError(f"background_share.min ({self.min}) must not exceed max ({self.max})")
        return self


class ValidateConfig(Section):
    """The data-quality checks of `detops validate` (docs/data-quality.md)."""

    section: ClassVar[str] = "validate"

    dataset: Path = Path("data/dataset")
    report: Path = Path("reports/validate")
    min_instances_per_class: MinInstances = MinInstances()
    min_box_side_px: float = Field(2.0, ge=0)  # smaller boxes (either side) fail
    size_tolerance_px: int = Field(0, ge=0)  # allowed |decoded - annotated| image size
    background_share: BackgroundShare = BackgroundShare()


class TransformSpec(Section):
    """One albumentations transform: its class name, probability and keyword arguments."""

    name: str = Field(min_length=1)
    p: float = Field(0.5, ge=0, le=1)
    args: dict[str, Any] = {}


def _default_transforms() -> list[TransformSpec]:
    # Mild, box-safe photometric and geometric jitter for the synthetic shapes. Colour is part of each
    # class (hues 24+ apart, jittered by 6), so the hue shift stays small.
    return [
        TransformSpec(name="HorizontalFlip", p=0.5),
        TransformSpec(name="Affine", p=0.5, args={"scale": [0.8, 1.2], "fill": 114,
                                                  "translate_percent": {"x": [-0.1, 0.1], "y": [-0.1, 0.1]}}),
        TransformSpec(name="RandomBrightnessContrast", p=0.5,
                      args={"brightness_limit": 0.2, "contrast_limit": 0.2}),
        TransformSpec(name="HueSaturationValue", p=0.3,
                      args={"hue_shift_limit": 4, "sat_shift_limit": 20, "val_shift_limit": 15}),
        TransformSpec(name="RandomGamma", p=0.2, args={"gamma_limit": [80, 120]}),
        TransformSpec(name="GaussNoise", p=0.2, args={"std_range": [0.02, 0.05]}),
        TransformSpec(name="Blur", p=0.1, args={"blur_limit": [3, 5]}),
        TransformSpec(name="MotionBlur", p=0.1, args={"blur_limit": [3, 7]}),
    ]


class AugmentConfig(Section):
    """The augmented train set of `detops augment` (docs/data-quality.md)."""

    section: ClassVar[str] = "augment"

    dataset: Path = Path("data/dataset")
    out: Path = Path("data/augmented")
    report: Path = Path("reports/augment")
    copies: int = Field(2, ge=0)  # augmented copies per train image, next to the original
    seed: int = 0
    bbox_rule: Literal["clip", "drop"] = "clip"
    min_visibility: float = Field(0.3, ge=0, le=1)  # share of a box's area that must stay in the image
    transforms: list[TransformSpec] = Field(default_factory=_default_transforms)
