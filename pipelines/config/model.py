"""Sections of the model stages: train, tune, evaluate, register (with its gates)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.config.base import Section


class TrainConfig(Section):
    section: ClassVar[str] = "train"

    dataset: Path = Path("data/augmented")
    out: Path = Path("models")
    model: str = "yolov8n.yaml"
    # Initial weights to fine-tune from (a detops model's best.pt, e.g. the champion's); None: fresh
    # weights from `model`. The architecture then comes from the weights.
    weights: Path | None = None
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


class ImportConfig(Section):
    """`detops import`: an existing ultralytics model (.pt, or its ONNX export: fp32/fp16, static or
    dynamic batch, or an int8 QDQ copy) into a model folder that evaluate/register/build take as a
    trained one (training/importer.py)."""

    section: ClassVar[str] = "import"

    source: Path | None = None  # the .pt or .onnx file (usually given on the command line)
    out: Path = Path("models")
    # The labeling config whose classes the model must have, by name; None: the model's own names.
    labeling_config: Path | None = None
    # check: the same names in the same order; map: the config's classes picked and reordered from the
    # model's (a COCO model serving a 3-class project), an absent one is an error.
    classes: Literal["check", "map"] = "check"
    imgsz: int | None = Field(None, ge=32, multiple_of=32)  # .pt only: export size (None: its training size)
    experiment: str = "detops"  # an MLflow run records the import; `detops.*` tags reach the registry
    tags: dict[str, str] = {}


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

    section: ClassVar[str] = "tune"

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


SLICE_NAME = r"^[A-Za-z0-9_.-]+$"
BASE_SLICE = "base"  # the dataset's own test split: not a slice name


class EvalSlice(Section):
    """A named extra test set: one split of a YOLO dataset with the model's classes (e.g. the
    held-out part of a feedback batch, written by ingest's `holdout`)."""

    dataset: Path
    split: Literal["train", "val", "test"] = "test"


class EvaluateConfig(Section):
    section: ClassVar[str] = "evaluate"

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
    smoke_images: int = Field(8, ge=1)  # test images whose served predictions a deployment checks
    experiment: str = "detops"  # used only when the model card's training run is not in the store
    variant: Literal["fp32", "int8"] = "fp32"  # int8: the quantized copy (MLflow metrics test_int8_*)
    # Named extra test sets evaluated like the base test split (same COCO metrics, `map50_95/<name>`).
    slices: dict[Annotated[str, Field(pattern=SLICE_NAME)], EvalSlice] = {}

    @model_validator(mode="after")
    def _no_base_slice(self) -> EvaluateConfig:
        if BASE_SLICE in self.slices:
            raise ValueError(f"slice name {BASE_SLICE!r} is reserved for the dataset's test split")
        return self


class Gates(Section):
    min_map50_95: float = Field(0.70, ge=0, le=1)
    max_dece_calibrated: float = Field(0.05, ge=0, le=1)
    max_latency_ms: float = Field(200.0, gt=0)
    max_map_regression: float = Field(0.01, ge=0)
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 0
    # Slices (evaluate.slices) the challenger must improve on: the lower end of the 95% paired-bootstrap
    # interval of mAP(challenger) - mAP(champion) on each must reach `min_target_improvement` (> 0).
    target_slices: list[Annotated[str, Field(pattern=SLICE_NAME)]] = []
    min_target_improvement: float = Field(0.02, gt=0, le=1)


class RegisterConfig(Section):
    section: ClassVar[str] = "register"

    model_name: str = "detops-detector"
    model_dir: Path = Path("models")
    evaluation: Path = Path("reports/evaluate")
    dataset: Path = Path("data/dataset")
    gates: Gates = Gates()


class QuantizeConfig(Section):
    """`detops quantize` (a static int8 QDQ copy of the ONNX model) and the gate that picks the variant
    `detops register` registers (evaluation/quantize.py)."""

    section: ClassVar[str] = "quantize"

    enabled: bool = True  # false: fp32 is registered whatever an int8 evaluation says
    model_dir: Path = Path("models")
    dataset: Path = Path("data/dataset")
    out: Path = Path("models/int8")
    evaluation: Path = Path("reports/evaluate/int8")  # where `detops evaluate` wrote the int8 figures
    calibration_splits: list[Literal["train", "val"]] = Field(["train"], min_length=1)
    calibration_images: int = Field(64, ge=1)
    per_channel: bool = True
    float_tail: bool = True  # the head's box decoding stays in float (8-bit coordinates lose pixels)
    max_map_drop: float = Field(0.01, ge=0)  # int8 only if the CI lower bound of its mAP delta is above -this
