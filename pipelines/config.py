"""Typed configuration: one pydantic model per section of params.yaml.

Each CLI verb (and so each DVC stage) reads its own section. Unknown keys and wrong types are refused
with a one-line message naming the key, e.g. ``params.yaml: train.epochs: Input should be a valid
integer (got 'ten')``. Paths are relative to the working directory, as DVC runs stages from the
repository root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import DetopsError

PARAMS_ENV = "DETOPS_PARAMS"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


# --------------------------------------------------------------------------- data
ShiftName = Literal["dark", "blur", "background", "scale", "unseen_class"]


class SynthesizeConfig(Section):
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


class IngestConfig(Section):
    export: Path | list[Path] = Path("data/raw/export.json")  # several: tasks merged, images deduplicated
    labeling_config: Path | None = None  # None: <export dir>/labeling_config.xml
    images_root: Path | None = None  # default: each export's own folder
    out: Path = Path("data/dataset")
    split: SplitFractions = SplitFractions()
    seed: int = 0
    annotator_policy: Literal["latest", "first"] = "latest"
    clip_tolerance: float = Field(0.01, ge=0, le=0.1)  # boxes out of the image by at most this share are clipped
    http_timeout_s: float = Field(10.0, gt=0)

    @property
    def exports(self) -> list[Path]:
        """`export` as a list."""
        return list(self.export) if isinstance(self.export, list) else [self.export]


class MinInstances(Section):
    """Minimum number of boxes of every class in each split (validate)."""

    train: int = Field(10, ge=0)
    val: int = Field(3, ge=0)
    test: int = Field(3, ge=0)


class ValidateConfig(Section):
    """The data-quality checks of `detops validate` (docs/data-quality.md)."""

    dataset: Path = Path("data/dataset")
    report: Path = Path("reports/validate")
    min_instances_per_class: MinInstances = MinInstances()
    min_box_side_px: float = Field(2.0, ge=0)  # smaller boxes (either side) fail
    size_tolerance_px: int = Field(0, ge=0)  # allowed |decoded - annotated| image size


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

    dataset: Path = Path("data/dataset")
    out: Path = Path("data/augmented")
    report: Path = Path("reports/augment")
    copies: int = Field(2, ge=0)  # augmented copies per train image, next to the original
    seed: int = 0
    bbox_rule: Literal["clip", "drop"] = "clip"
    min_visibility: float = Field(0.3, ge=0, le=1)  # share of a box's area that must stay in the image
    transforms: list[TransformSpec] = Field(default_factory=_default_transforms)


# --------------------------------------------------------------------------- model
class TrainConfig(Section):
    dataset: Path = Path("data/augmented")
    out: Path = Path("models")
    model: str = "yolov8n.yaml"
    # A multiple of the max stride: ultralytics would silently round it up, and the card states it.
    imgsz: int = Field(160, ge=32, multiple_of=32)
    epochs: int = Field(12, ge=1)
    batch: int = Field(16, ge=1)
    lr0: float = Field(0.01, gt=0)
    # ultralytics' names; it would refuse any other only after the MLflow run and dataloaders started.
    optimizer: Literal["SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp", "auto"] = "AdamW"
    patience: int = Field(100, ge=0)
    seed: int = 0
    device: str = "cpu"
    workers: int = Field(2, ge=0)
    deterministic: bool = True
    experiment: str = "detops"
    runs: Path = Path("runs/train")  # ultralytics' run folders (git-ignored), one per MLflow run id
    report: Path = Path("reports/train")  # DVC metrics.json and per-epoch results.csv/png
    hyp: dict[str, Any] = {}  # any other ultralytics train argument, passed through
    tags: dict[str, str] = {}  # extra MLflow run tags; `detops.*` ones are copied onto the model version


class SearchDim(Section):
    """One dimension of the tuning search space: a float or int range, or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDim:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} dimension needs 'low' <= 'high'")
        elif self.log and (self.low <= 0 or self.step is not None):  # what Optuna would refuse mid-study
            raise ValueError("a log-scale dimension needs 'low' > 0 and no 'step'")
        return self


class TuneConfig(Section):
    """`detops tune`: an Optuna study whose trials train with the `train:` section, overridden by the
    sampled values (keys of `train:` set those fields, any other key goes to `train.hyp`)."""

    n_trials: int = Field(10, ge=1)
    timeout_s: int | None = None
    epochs: int = Field(10, ge=1)
    study_name: str = "detops-tune"
    storage: str = "sqlite:///reports/tune/optuna.db"
    out: Path = Path("reports/tune/best_params.yaml")
    experiment: str = "detops-tune"
    seed: int = 0
    pruner_startup_trials: int = Field(2, ge=0)
    pruner_warmup_epochs: int = Field(1, ge=0)
    space: dict[str, SearchDim] = {
        "lr0": SearchDim(type="float", low=1e-4, high=1e-2, log=True),
    }


class EvaluateConfig(Section):
    model_dir: Path = Path("models")
    dataset: Path = Path("data/dataset")
    out: Path = Path("reports/evaluate")
    conf: float = Field(0.001, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_det: int = Field(300, ge=1)
    calibration_method: Literal["platt", "isotonic", "none"] = "platt"
    calibration_min_conf: float = Field(0.1, ge=0, le=1)
    calibration_iou: float = Field(0.5, gt=0, le=1)
    dece_bins: int = Field(10, ge=2)  # equal-width confidence bins of D-ECE and the reliability diagram
    dece_box_bins: int = Field(2, ge=1)  # equal-width bins on each of cx, cy, w, h (1: confidence only)
    batch: int = Field(16, ge=1)  # images per inference call while predicting the splits
    latency_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field([1, 2, 4, 8, 16], min_length=1)
    latency_repeats: int = Field(20, ge=1)
    experiment: str = "detops"  # used only when the model card's training run is not in the store


class Gates(Section):
    min_map50_95: float = Field(0.70, ge=0, le=1)
    max_dece_calibrated: float = Field(0.05, ge=0, le=1)
    max_latency_ms: float = Field(200.0, gt=0)
    max_map_regression: float = Field(0.01, ge=0)
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 0


class RegisterConfig(Section):
    model_name: str = "detops-detector"
    model_dir: Path = Path("models")
    evaluation: Path = Path("reports/evaluate")
    dataset: Path = Path("data/dataset")
    gates: Gates = Gates()


# --------------------------------------------------------------------------- serving & monitoring
class ServeConfig(Section):
    """The BentoML service (serving/): model, batching, limits, cache, prediction log. Every field can
    be overridden by an environment variable DETOPS_SERVE_<FIELD> (serving/settings.py)."""

    model_name: str = "detops-detector"
    alias: str = "champion"
    store_version: str = "latest"  # which version of the imported model the service serves
    workers: int = Field(2, ge=1)
    timeout_s: int = Field(60, ge=1)
    max_batch_size: int = Field(16, ge=1)
    max_latency_ms: int = Field(1000, ge=1)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_batch_images: int = Field(32, ge=1)
    cache_entries: int = Field(1024, ge=0)
    threads: int | None = Field(None, ge=1)  # ONNX Runtime intra-op threads; default: cores / workers
    prediction_log: Path = Path("monitoring_store")
    keep_images: bool = False


class DriftConfig(Section):
    store: Path = Path("monitoring_store")
    out: Path = Path("reports/monitoring")
    reference: Path | None = None  # None: the serving model version's MLflow artifact reference/reference.parquet
    window_last_n: int | None = Field(200, ge=1)
    window_since: str | None = None  # ISO time, e.g. 2026-11-21T10:00 (UTC when no offset)
    min_window: int = Field(100, ge=10)  # fewer logged images: an error, not a verdict
    min_reference: int = Field(50, ge=10)
    drift_share: float = Field(0.3, gt=0, le=1)  # share of drifted columns (embedding counts as one)
    embedding_auc: float = Field(0.6, gt=0.5, le=1)  # domain-classifier ROC AUC above which embeddings drift
    seed: int = 0


class PushConfig(Section):
    project_title: str = "detops feedback"
    max_per_run: int = Field(50, ge=1)
    max_per_day: int = Field(200, ge=1)
    low_conf: float = Field(0.4, ge=0, le=1)
    many_detections: int = Field(10, ge=1)
    out: Path = Path("reports/monitoring/labelstudio_import.json")  # written when LABEL_STUDIO_URL is not set
    state: Path = Path("reports/monitoring/push_state.json")  # pushed hashes and times (per-day limit)
    document_root: Path = Path("monitoring_store")  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the server


class LoadTestConfig(Section):
    """`make loadtest`: Locust's load shape and the SLOs that set its exit code."""

    model_dir: Path = Path("models")
    out: Path = Path("reports/load")
    users: int = Field(8, ge=1)
    spawn_rate: float = Field(4.0, gt=0)
    run_time: str = Field("30s", pattern=r"^\d+[smh]$")  # Locust's -t syntax
    max_p95_ms: float = Field(1500.0, gt=0)  # SLO: 95th percentile of every request's latency
    max_failure_ratio: float = Field(0.01, ge=0, le=1)  # SLO: failed / all requests
    batch_images: int = Field(4, ge=1)  # images per /detect_batch request
    synthetic_images: int = Field(32, ge=1)  # synthetic images rendered at start-up (no dataset folder)
    images: Path | None = None  # a folder of .jpg/.png images to send instead of the synthetic ones
    cache: bool = False  # keep the service's result cache on (repeated images then skip the model)


class Params(Section):
    """All of params.yaml. Sections not written in the file take their defaults."""

    synthesize: SynthesizeConfig = SynthesizeConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    serve: ServeConfig = ServeConfig()
    drift: DriftConfig = DriftConfig()
    push: PushConfig = PushConfig()
    loadtest: LoadTestConfig = LoadTestConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


S = TypeVar("S", bound=Section)


def params_path(path: Path | str | None = None) -> Path:
    """The params file: the argument, else $DETOPS_PARAMS, else ./params.yaml."""
    return Path(path or os.environ.get(PARAMS_ENV) or "params.yaml")


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate params.yaml; a missing file gives the defaults."""
    file = params_path(path)
    raw: Any = {}
    if file.exists():
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DetopsError(f"{file}: not valid YAML ({' '.join(str(exc).split())})") from None
        except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, binary content
            raise DetopsError(f"{file}: cannot read the params file ({exc})") from None
        if not isinstance(raw, dict):
            raise DetopsError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise DetopsError(format_validation_error(file, exc)) from None


def load_section(name: str, path: Path | str | None = None, **overrides: Any) -> Any:
    """One section of params.yaml with the non-None `overrides` applied and validated."""
    params = load_params(path)
    # `validate` and `register` clash with BaseModel/ABC attributes: their fields end in "_".
    section = getattr(params, name + "_" if name in ("validate", "register") else name)
    return override(section, file=params_path(path), prefix=name, **overrides)


def override(section: S, *, file: Path | str = "params.yaml", prefix: str = "", **overrides: Any) -> S:
    """A copy of `section` with the non-None overrides applied, validated like the file."""
    updates = {k: v for k, v in overrides.items() if v is not None}
    if not updates:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **updates})
    except ValidationError as exc:
        raise DetopsError(format_validation_error(Path(file), exc, prefix)) from None


def format_validation_error(file: Path, exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted key: `params.yaml: train.epochs: ...`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        loc = loc.replace("validate_", "validate").replace("register_", "register")
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"{file}: {loc}: {msg}{got}")
    return "; ".join(lines)
