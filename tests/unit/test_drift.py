"""Drift, for real with Evidently, both ways: shifted traffic from the synthetic generator is flagged,
traffic from another seed of the same generator is not. Windows are featurized through the same
model runtime and feature code as the prediction log."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from monitoring.drift import compare, run_drift
from monitoring.logger import PredictionLogger
from monitoring.reference import build_reference, featurize_files, load_reference, save_reference
from monitoring.store import records_frame
from pipelines.cli.main import app
from pipelines.config.data import IngestConfig, SplitFractions, SynthesizeConfig
from pipelines.config.monitoring import DriftConfig
from pipelines.errors import DetopsError, DriftDetected
from pipelines.images import read_rgb

SIDES = {"min_side": 96, "max_side": 160}  # as the session's tiny model was trained on
WINDOW = 110  # >= drift.min_window (100)


@pytest.fixture(scope="module")
def reference(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference profile of ~120 test images (seed 11) written as parquet."""
    from labeling.ingest import ingest
    from labeling.synthetic import synthesize

    root = tmp_path_factory.mktemp("drift_ref")
    raw = synthesize(SynthesizeConfig(out=root / "raw", n_images=150, seed=11, **SIDES))
    ingest(IngestConfig(export=raw / "export.json", labeling_config=raw / "labeling_config.xml",
                        out=root / "ds", split=SplitFractions(train=0.1, val=0.1, test=0.8)))
    return save_reference(build_reference(trained_model_dir, root / "ds"), root / "reference.parquet")


def _window_images(root: Path, shift: str | None, seed: int = 12) -> list[Path]:
    from labeling.synthetic import synthesize

    out = synthesize(SynthesizeConfig(out=root, n_images=WINDOW, seed=seed, shift=shift, messy=False, **SIDES))
    return sorted((out / "images").glob("*.jpg"))


def _window(trained_model_dir: Path, root: Path, shift: str | None) -> pd.DataFrame:
    from serving.runtime import ModelRuntime

    return records_frame(featurize_files(ModelRuntime.load(trained_model_dir), _window_images(root, shift)))


def test_reference_has_the_logged_features(reference: Path) -> None:
    df = load_reference(reference)
    assert len(df) >= 100
    assert {"brightness", "sharpness", "colourfulness", "n_detections", "emb_0", "image_sha256"} <= set(df.columns)


def test_in_distribution_is_not_flagged(reference: Path, trained_model_dir: Path, tmp_path: Path) -> None:
    result = compare(load_reference(reference), _window(trained_model_dir, tmp_path, None), DriftConfig())
    assert not result.drift_detected, result.drifted_features
    assert result.drifted_share < DriftConfig().drift_share


def test_dark_shift_is_flagged_with_the_features_that_moved(reference: Path, trained_model_dir: Path,
                                                            tmp_path: Path) -> None:
    result = compare(load_reference(reference), _window(trained_model_dir, tmp_path, "dark"), DriftConfig())
    assert result.drift_detected
    assert {"brightness", "contrast"} <= set(result.drifted_features)
    assert "width" not in result.drifted_features  # the shift leaves image sizes alone
    by_name = {f.feature: f for f in result.features}
    assert by_name["brightness"].score < 0.05 and by_name["brightness"].test.startswith("K-S")


def test_window_too_small_is_an_error(reference: Path) -> None:
    ref = load_reference(reference)
    with pytest.raises(DetopsError, match="window has 20 logged images.*min_window=100"):
        compare(ref, ref.head(20), DriftConfig())


def test_drift_cli_on_logged_traffic(reference: Path, trained_model_dir: Path, tmp_path: Path) -> None:
    """Shifted traffic goes through the real prediction logger into a store; `detops drift` exits 3
    and writes the HTML, JSON, DVC metric and Prometheus files."""
    from serving.runtime import ModelRuntime

    runtime = ModelRuntime.load(trained_model_dir)
    store, out = tmp_path / "store", tmp_path / "reports"
    logger = PredictionLogger(store, class_names=runtime.class_names)
    import hashlib

    for path in _window_images(tmp_path / "dark", "dark", seed=14):
        image = read_rgb(path)
        logger.log(image, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), request_id=path.name,
                   detections=runtime.predict([image])[0], model_name="m", model_version="1")
    logger.close()
    result = CliRunner().invoke(app, ["drift", "--store", str(store), "--reference", str(reference),
                                      "--out", str(out), "--last-n", str(WINDOW)])
    assert result.exit_code == 3, result.output
    assert "drift detected" in result.output and "brightness" in result.output
    report = json.loads((out / "drift.json").read_text())
    assert report["drift_detected"] is True and report["n_current"] == WINDOW
    assert "brightness" in report["drifted_features"]
    assert json.loads((out / "drift_metrics.json").read_text())["drift_detected"] == 1
    prom = (out / "drift.prom").read_text()
    assert "detops_drift_detected 1.0" in prom and 'detops_drift_feature_drifted{feature="brightness"} 1.0' in prom
    assert (out / "drift.html").stat().st_size > 100_000
    with pytest.raises(DriftDetected):
        run_drift(DriftConfig(store=store, reference=reference, out=out, window_last_n=WINDOW))
    with pytest.raises(DetopsError, match="window has 50 logged images"):
        run_drift(DriftConfig(store=store, reference=reference, out=out, window_last_n=50))

    # After a rollout: version 2 answers in-distribution traffic. Its window (--model-version 2) reads
    # only its own records, so the dark records of version 1 logged just before cannot leak in.
    logger = PredictionLogger(store, class_names=runtime.class_names)
    for path in _window_images(tmp_path / "calm", None, seed=12):
        image = read_rgb(path)
        logger.log(image, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), request_id=path.name,
                   detections=runtime.predict([image])[0], model_name="m", model_version="2")
    logger.close()
    mixed = ["drift", "--store", str(store), "--reference", str(reference), "--out", str(out),
             "--last-n", str(2 * WINDOW)]
    assert CliRunner().invoke(app, mixed).exit_code == 3  # both versions' records: the dark ones drift
    after = CliRunner().invoke(app, [*mixed, "--model-version", "2"])
    assert after.exit_code == 0, after.output
    assert f"model version 2 ({WINDOW} images)" in after.output
