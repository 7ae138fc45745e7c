"""Sections of monitoring: drift reports and the push to Label Studio."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from pipelines.config.base import Section
from pipelines.config.data import ShiftName


class DriftConfig(Section):
    section: ClassVar[str] = "drift"

    store: Path = Path("monitoring_store")
    out: Path = Path("reports/monitoring")
    reference: Path | None = None  # None: the serving model version's MLflow artifact reference/reference.parquet
    window_last_n: int | None = Field(200, ge=1)
    window_since: str | None = None  # ISO time, e.g. 2026-11-21T10:00 (UTC when no offset)
    model_version: str | None = None  # window: only records logged by this model version (None: any)
    min_window: int = Field(100, ge=10)  # fewer logged images: an error, not a verdict
    min_reference: int = Field(50, ge=10)
    drift_share: float = Field(0.3, gt=0, le=1)  # share of drifted columns (embedding counts as one)
    embedding_auc: float = Field(0.6, gt=0.5, le=1)  # domain-classifier ROC AUC above which embeddings drift
    seed: int = 0


class PushConfig(Section):
    section: ClassVar[str] = "push"

    project_title: str = "detops feedback"
    max_per_run: int = Field(50, ge=1)
    max_per_day: int = Field(200, ge=1)
    low_conf: float = Field(0.4, ge=0, le=1)
    many_detections: int = Field(10, ge=1)
    out: Path = Path("reports/monitoring/labelstudio_import.json")  # written when LABEL_STUDIO_URL is not set
    state: Path = Path("reports/monitoring/push_state.json")  # pushed hashes and times (per-day limit)
    document_root: Path = Path("monitoring_store")  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the server


class LoopConfig(Section):
    """`make loop-demo` (monitoring/loop.py): the whole monitoring loop at demo size. The tiny sizes of
    the integration test override these."""

    section: ClassVar[str] = "loop"

    work: Path = Path("reports/loop/work")  # datasets, models, registry, prediction log, deployment, Label Studio
    out: Path = Path("reports/loop")  # summary.md, summary.json, plots, drift reports, gates.json
    model_name: str = "detops-loop"  # its own registry model: the loop never moves the project's champion
    experiment: str = "detops-loop"
    seed: int = 1
    classes: list[str] = ["square", "circle", "triangle", "star"]
    min_side: int = Field(96, ge=32)
    max_side: int = Field(160, ge=32)
    base_images: int = Field(300, ge=20)
    base_epochs: int = Field(60, ge=1)  # near convergence: fine-tuning alone must not lift every split
    imgsz: int = Field(128, ge=32, multiple_of=32)
    batch: int = Field(16, ge=1)
    # `night` moves the model's outputs and labels can teach it; `dark` barely moves them, `gray` cannot be
    # taught from a few labels, `scale` changes the scene's box sizes themselves (docs/monitoring.md).
    shift: ShiftName = "night"
    traffic: int = Field(150, ge=10)  # images per traffic window (before and after the rollout)
    rate: float = Field(20.0, gt=0)  # requests per second
    labels: int = Field(150, ge=1)  # drifted images pushed to Label Studio and annotated
    holdout_fraction: float = Field(0.4, gt=0, lt=1)  # of the labels: the target slice, never trained on
    # After the rollout, the same recipe from only this many of the labels (0: skip): the gate must refuse
    # it and the champion stay live; the same target slice judges both challengers.
    few_labels: int = Field(3, ge=0)
    augment_copies: int = Field(1, ge=0)
    finetune_epochs: int = Field(15, ge=1)
    finetune_lr0: float = Field(0.002, gt=0)  # below train.lr0: the champion's weights are a good start
    min_base_map: float = Field(0.3, ge=0, le=1)  # the champion must be a real model: evidence, not noise
    # The CI lower end of the base split's mAP delta must be >= -this: the model gates' 0.01 (register.gates)
    max_map_regression: float = Field(0.01, ge=0)
    min_target_improvement: float = Field(0.03, gt=0, le=1)  # CI lower end of the target slice's gain
    bootstrap_samples: int = Field(500, ge=10)
    min_window: int = Field(50, ge=10)  # drift windows of the loop (drift.min_window for this loop)
    min_reference: int = Field(20, ge=10)
