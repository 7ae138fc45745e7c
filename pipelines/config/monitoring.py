"""Sections of monitoring: drift reports and the push to Label Studio."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from pipelines.config.base import Section


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
