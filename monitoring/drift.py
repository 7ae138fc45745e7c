"""`detops drift`: compare a window of the prediction log with the reference profile using Evidently.

Columns: the per-image statistics and prediction summaries (DataDriftPreset: Evidently picks the
two-sample Kolmogorov-Smirnov test, p < 0.05, for numerical columns under 1000 rows) and the
embedding (EmbeddingsDrift with a domain classifier: drift when its ROC AUC exceeds
`drift.embedding_auc`). The verdict: drift when the share of drifted columns, the embedding counted
as one column, reaches `drift.drift_share`.

Outputs in `drift.out`: drift.html (Evidently), drift.json (verdict and per-feature detail),
drift_metrics.json (for DVC) and drift.prom (Prometheus textfile collector).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitoring.store import BASE_COLUMNS, EMBEDDING_PREFIX, open_store
from pipelines.config.monitoring import DriftConfig
from pipelines.errors import DetopsError, DriftDetected

if TYPE_CHECKING:
    import pandas as pd

EMBEDDING_NAME = "embedding"


@dataclass
class FeatureDrift:
    """One column's test: Evidently's method, its score (a p-value for K-S), threshold and outcome."""

    feature: str
    test: str
    score: float
    threshold: float
    drifted: bool


@dataclass
class DriftResult:
    """The verdict and its evidence."""

    drift_detected: bool
    drifted_share: float
    drift_share: float
    n_drifted: int
    n_columns: int
    n_reference: int
    n_current: int
    window: str
    features: list[FeatureDrift] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # columns with no values on one side

    @property
    def drifted_features(self) -> list[str]:
        """Names of the drifted columns (and `embedding`), most significant first."""
        return [f.feature for f in self.features if f.drifted]


def feature_columns(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """(tabular columns, embedding columns, skipped columns) shared by both frames."""
    import pandas as pd

    meta = set(BASE_COLUMNS) - {"width", "height"}  # the image size is a feature, the rest is bookkeeping
    common = [c for c in reference.columns if c in current.columns and c not in meta]
    emb = [c for c in common if c.startswith(EMBEDDING_PREFIX)]
    tabular, skipped = [], []
    for c in common:
        if c in emb:
            continue
        # A column empty on one side (e.g. confidences when the model never detects) cannot be tested
        # (n_detections still carries that signal); one constant on both sides carries no information
        # and would only dilute the drifted share.
        if (reference[c].notna().sum() < 2 or current[c].notna().sum() < 2
                or pd.concat([reference[c], current[c]]).nunique() < 2):
            skipped.append(c)
        else:
            tabular.append(c)
    return tabular, emb, skipped


def compare(reference: pd.DataFrame, current: pd.DataFrame, cfg: DriftConfig, window: str = "",
            html: Path | None = None) -> DriftResult:
    """Run the Evidently report on two feature frames and return the verdict (writes `html` if given)."""
    import numpy as np
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset

    if len(reference) < cfg.min_reference:
        raise DetopsError(f"reference profile has {len(reference)} images; drift needs at least "
                          f"drift.min_reference={cfg.min_reference}")
    if len(current) < cfg.min_window:
        raise DetopsError(f"window has {len(current)} logged images; drift needs at least "
                          f"drift.min_window={cfg.min_window} (log more traffic or widen the window)")
    tabular, emb, skipped = feature_columns(reference, current)
    if not tabular:
        raise DetopsError("reference and window share no feature columns (different feature versions?)")
    definition = DataDefinition(numerical_columns=tabular, embeddings={EMBEDDING_NAME: emb} if emb else None)
    columns = tabular + emb
    metrics: list[Any] = [DataDriftPreset(columns=tabular, drift_share=cfg.drift_share)]
    if emb:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING_NAME,
                                       drift_method=ModelDriftMethod(threshold=cfg.embedding_auc)))
    np.random.seed(cfg.seed)  # Evidently's samplers use numpy's global generator
    snapshot = Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current[columns].astype("float64").reset_index(drop=True), data_definition=definition),
        Dataset.from_pandas(reference[columns].astype("float64").reset_index(drop=True), data_definition=definition))
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html))
    features = _parse(snapshot.dict(), cfg)
    n_drifted = sum(f.drifted for f in features)
    share = n_drifted / len(features)
    # The per-column K-S tests need a share to keep chance alarms out (18 tests at alpha 0.05 give about
    # one); the embedding test is already one multivariate test (a classifier telling the window from
    # the reference), so it alone is enough.
    embedding_drifted = any(f.drifted for f in features if f.feature == EMBEDDING_NAME)
    return DriftResult(drift_detected=share >= cfg.drift_share or embedding_drifted, drifted_share=share,
                       drift_share=cfg.drift_share,
                       n_drifted=n_drifted, n_columns=len(features), n_reference=len(reference),
                       n_current=len(current), window=window, skipped=skipped,
                       features=sorted(features, key=lambda f: (not f.drifted, f.feature)))


def _parse(snapshot: dict, cfg: DriftConfig) -> list[FeatureDrift]:
    # The per-column outcome is the status of Evidently's own "Value Drift" test on that column.
    failed = {t["metric_config"]["metric_id"] for t in snapshot["tests"]
              if t["metric_config"]["params"]["type"].endswith("ValueDrift") and t["status"] == "FAIL"}
    out = []
    for m in snapshot["metrics"]:
        kind = m["config"]["type"]
        if kind.endswith(":ValueDrift"):
            out.append(FeatureDrift(m["config"]["column"], m["config"]["method"], float(m["value"]),
                                    float(m["config"]["threshold"]), m["id"] in failed))
        elif kind.endswith(":EmbeddingsDrift"):
            auc = float(m["value"])
            out.append(FeatureDrift(EMBEDDING_NAME, "domain classifier ROC AUC", auc, cfg.embedding_auc,
                                    auc > cfg.embedding_auc))
    if not out:
        raise DetopsError("Evidently returned no per-column drift results")
    return out


def read_window(cfg: DriftConfig) -> tuple[pd.DataFrame, str]:
    """The window of the prediction log named by the config, and its description."""
    since = None
    if cfg.window_since:
        try:
            since = datetime.fromisoformat(cfg.window_since)
        except ValueError:
            raise DetopsError(f"drift.window_since: not an ISO time: {cfg.window_since!r} "
                              "(e.g. 2026-11-21T10:00)") from None
        since = since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since
    store = Path(cfg.store)
    if not (store / "predictions.db").exists():
        raise DetopsError(f"{store}: no prediction log here (serve with serve.prediction_log set)")
    # A version filter keeps a window after a rollout free of the previous model's records.
    df = open_store(store).read(since=since, last_n=cfg.window_last_n, model_version=cfg.model_version)
    parts = ([f"since {since.isoformat()}"] if since else []) + (
        [f"last {cfg.window_last_n}"] if cfg.window_last_n else []) + (
        [f"model version {cfg.model_version}"] if cfg.model_version else [])
    return df, ", ".join(parts) or "whole log"


def write_outputs(result: DriftResult, out: Path) -> None:
    """drift.json, drift_metrics.json and drift.prom in `out`."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    out.mkdir(parents=True, exist_ok=True)
    detail = asdict(result)
    for f in detail["features"]:  # JSON has no NaN
        f["score"] = None if math.isnan(f["score"]) else f["score"]
    (out / "drift.json").write_text(json.dumps({**detail, "drifted_features": result.drifted_features}, indent=2))
    metrics = {"drift_detected": int(result.drift_detected), "drifted_share": result.drifted_share,
               "n_drifted": result.n_drifted, "n_columns": result.n_columns, "n_current": result.n_current}
    (out / "drift_metrics.json").write_text(json.dumps(metrics, indent=2))
    registry = CollectorRegistry()
    Gauge("detops_drift_detected", "1 when the last drift report found drift", registry=registry).set(
        int(result.drift_detected))
    Gauge("detops_drift_share", "Share of drifted feature columns in the last report", registry=registry).set(
        result.drifted_share)
    Gauge("detops_drift_window_images", "Images in the last drift window", registry=registry).set(result.n_current)
    per = Gauge("detops_drift_feature_drifted", "1 when the feature drifted in the last report", ["feature"],
                registry=registry)
    for f in result.features:
        per.labels(feature=f.feature).set(int(f.drifted))
    Gauge("detops_drift_report_timestamp_seconds", "When the last drift report ran", registry=registry).set(
        datetime.now(timezone.utc).timestamp())
    write_to_textfile(str(out / "drift.prom"), registry)


def run_drift(cfg: DriftConfig, *, model_name: str = "detops-detector", alias: str = "champion") -> DriftResult:
    """Load the reference and the window, compare, write every output; raise `DriftDetected` (exit
    code 3) when drift is found."""
    from monitoring.reference import load_reference

    current, window = read_window(cfg)
    reference = load_reference(cfg.reference, model_name=model_name, alias=alias)
    out = Path(cfg.out)
    result = compare(reference, current, cfg, window=window, html=out / "drift.html")
    write_outputs(result, out)
    if result.drift_detected:
        raise DriftDetected(f"drift detected: {result.n_drifted}/{result.n_columns} columns drifted "
                            f"(share {result.drifted_share:.2f} >= {cfg.drift_share}): "
                            f"{', '.join(result.drifted_features)}; report {out / 'drift.html'}")
    return result
