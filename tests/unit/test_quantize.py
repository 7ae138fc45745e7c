"""The variant gate (evaluation/quantize.py): int8 is chosen only when the paired-bootstrap lower bound
of its mAP delta is above -max_map_drop and its calibrated D-ECE passes; the decision and both
variants' figures are written next to the fp32 evaluation. On hand-made COCO evaluations. The mutant
tests/mutants/gates.py (the gate reading the point estimate) must make the lower-bound check fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.quantize import VARIANT_FILE, calibration_images, choose_variant
from pipelines.config.model import QuantizeConfig
from pipelines.errors import DetopsError
from tests.mutants.gates import int8_gate_on_point_estimate


def _gt(n: int = 30) -> dict:
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, n + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200})
        for _ in range(2):
            x, y = rng.uniform(0, 120, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 0,
                                "bbox": [float(x), float(y), 60.0, 60.0], "area": 3600.0, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 0, "name": "square"}]}


def _dt(gt: dict, shift: float) -> list[dict]:
    # Each box moved by `shift` pixels: 0 is perfect, a few pixels cost mAP@.5:.95.
    return [{"image_id": a["image_id"], "category_id": 0, "score": 0.9,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1] + shift, 60.0, 60.0]} for a in gt["annotations"]]


def _dt_uneven(gt: dict, every: int, shift: float) -> list[dict]:
    # Exact boxes, but those of every `every`-th image moved by `shift` pixels: as good on average as a
    # 1-pixel error everywhere, much worse on a few images.
    return [{"image_id": a["image_id"], "category_id": 0, "score": 0.9,
             "bbox": [a["bbox"][0] + s, a["bbox"][1] + s, 60.0, 60.0]}
            for a in gt["annotations"] for s in [shift if a["image_id"] % every == 0 else 0.0]]


def _evaluation(folder: Path, gt: dict, dt: list[dict], dece: float, latency: float,
                served: float | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "coco_gt.json").write_text(json.dumps(gt))
    (folder / "coco_dt.json").write_text(json.dumps(dt))
    (folder / "metrics.json").write_text(json.dumps({"map50_95": 0.5, "map50": 0.9, "dece": 0.1,
                                                     "dece_calibrated": dece, "latency_ms_batch1": latency,
                                                     "latency_ms_served_single": served or latency + 4}))
    return folder


@pytest.fixture()
def fp32(tmp_path: Path) -> Path:
    return _evaluation(tmp_path / "fp32", _gt(), _dt(_gt(), 1.0), 0.02, 10.0)


def _cfg(tmp_path: Path, **kw) -> QuantizeConfig:
    return QuantizeConfig(model_dir=tmp_path / "models", out=tmp_path / "models" / "int8",
                          evaluation=tmp_path / "int8", **kw)


def _choose(cfg: QuantizeConfig, fp32: Path):
    return choose_variant(cfg, cfg.model_dir, fp32, max_dece_calibrated=0.05, bootstrap_samples=200, seed=0)


def test_as_good_int8_is_chosen_and_both_figures_kept(tmp_path: Path, fp32: Path) -> None:
    _evaluation(tmp_path / "int8", _gt(), _dt(_gt(), 1.0), 0.03, 6.0)
    decision = _choose(_cfg(tmp_path), fp32)
    assert decision.chosen == "int8" and decision.model_dir == str(tmp_path / "models" / "int8")
    assert decision.delta_map50_95 == 0 and decision.ci_low == 0
    assert "1.67x faster" in decision.reason
    written = json.loads((fp32 / VARIANT_FILE).read_text())
    assert written["chosen"] == "int8" and written["fp32"]["latency_ms_batch1"] == 10.0
    assert written["int8"]["dece_calibrated"] == 0.03


def test_less_accurate_int8_is_refused(tmp_path: Path, fp32: Path) -> None:
    _evaluation(tmp_path / "int8", _gt(), _dt(_gt(), 6.0), 0.03, 6.0)
    decision = _choose(_cfg(tmp_path), fp32)
    assert decision.chosen == "fp32" and decision.model_dir == str(tmp_path / "models")
    assert decision.ci_low < -0.01 and "lower bound <= -0.01" in decision.reason
    assert decision.int8 is not None  # the refused variant's figures are kept


def check_int8_needs_the_lower_bound(tmp_path: Path, fp32: Path) -> None:
    """The guarantee, shared with the mutant test: an int8 model whose mAP delta is above -0.01 (here
    even positive) but whose interval's lower end is not keeps fp32."""
    _evaluation(tmp_path / "int8", _gt(), _dt_uneven(_gt(), 6, 4.0), 0.03, 6.0)
    decision = _choose(_cfg(tmp_path), fp32)
    assert decision.chosen == "fp32", decision
    assert "lower bound <= -0.01" in decision.reason


def test_int8_within_the_allowance_on_average_but_not_at_the_lower_bound_keeps_fp32(tmp_path: Path,
                                                                                    fp32: Path) -> None:
    check_int8_needs_the_lower_bound(tmp_path, fp32)
    decision = json.loads((fp32 / VARIANT_FILE).read_text())
    assert decision["delta_map50_95"] > -0.01 >= decision["ci_low"]  # the case it claims: +0.001, low -0.07


def test_int8_gate_on_the_point_estimate_is_caught(tmp_path: Path, fp32: Path) -> None:
    with int8_gate_on_point_estimate(), pytest.raises(AssertionError, match="chosen='int8'"):
        check_int8_needs_the_lower_bound(tmp_path, fp32)


def test_int8_faster_in_the_engine_but_slower_served_keeps_fp32(tmp_path: Path, fp32: Path) -> None:
    """As accurate and calibrated, 1.67x faster in the engine, but one request through the service's
    path takes longer than fp32's (14 ms): fp32 is served."""
    _evaluation(tmp_path / "int8", _gt(), _dt(_gt(), 1.0), 0.03, 6.0, served=15.0)
    decision = _choose(_cfg(tmp_path), fp32)
    assert decision.chosen == "fp32", decision
    assert "slower for one request through the service's path (15.0 ms vs fp32 14.0 ms)" in decision.reason
    faster = tmp_path / "faster"
    faster.mkdir()
    _evaluation(faster / "int8", _gt(), _dt(_gt(), 1.0), 0.03, 6.0, served=13.0)
    decision = _choose(_cfg(faster), fp32)
    assert decision.chosen == "int8" and "13.0 ms vs 14.0 ms" in decision.reason


def test_badly_calibrated_int8_is_refused(tmp_path: Path, fp32: Path) -> None:
    _evaluation(tmp_path / "int8", _gt(), _dt(_gt(), 1.0), 0.08, 6.0)
    decision = _choose(_cfg(tmp_path), fp32)
    assert decision.chosen == "fp32" and "D-ECE 0.0800 > 0.05" in decision.reason


def test_no_int8_disabled_or_other_model_is_fp32(tmp_path: Path, fp32: Path) -> None:
    assert "no int8 evaluation" in _choose(_cfg(tmp_path), fp32).reason
    _evaluation(tmp_path / "int8", _gt(), _dt(_gt(), 1.0), 0.03, 6.0)
    assert _choose(_cfg(tmp_path, enabled=False), fp32).chosen == "fp32"
    other = choose_variant(_cfg(tmp_path), tmp_path / "elsewhere", fp32, 0.05, 200, 0)
    assert other.chosen == "fp32" and "not of" in other.reason


def test_int8_evaluated_on_other_images_is_an_error(tmp_path: Path, fp32: Path) -> None:
    _evaluation(tmp_path / "int8", _gt(29), _dt(_gt(29), 1.0), 0.03, 6.0)
    with pytest.raises(DetopsError, match="other images"):
        _choose(_cfg(tmp_path), fp32)


def test_calibration_never_uses_test_images(yolo_dataset: Path) -> None:
    chosen = calibration_images(QuantizeConfig(dataset=yolo_dataset, calibration_images=1000))
    assert chosen and all(p.parent.parent.name == "train" or p.parent.name == "train" for p in chosen)
    with pytest.raises(ValueError):
        QuantizeConfig(calibration_splits=["test"])


def test_calibration_feeds_a_static_batch_its_own_size(tmp_path: Path) -> None:
    """A model exported with a static batch of 3 calibrates on 4 images (the short last batch filled
    from the start), and its int8 copy keeps the batch; a dynamic one takes any count."""
    from evaluation.quantize import quantize_model
    from serving.runtime import ModelRuntime
    from tests.unit.test_runtime import _write_model_dir

    images = [np.full((40 + 8 * i, 64, 3), 30 * i, np.uint8) for i in range(4)]
    for batch in (3, "batch"):
        source = _write_model_dir(tmp_path / f"fp32-{batch}", batch=batch)
        int8 = quantize_model(source, tmp_path / f"int8-{batch}", images, float_tail=False)
        assert ModelRuntime.load(int8, threads=1).static_batch == (batch if batch == 3 else None)
