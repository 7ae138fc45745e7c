"""Gate logic on hand-written metrics (the real evaluate -> register round trip is in
tests/integration/test_registry.py), and the monitoring loop's gates. The mutant
tests/mutants/gates.py (`no_regression` on the point estimate) must make the lower-bound checks fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

import evaluation.gates
from evaluation.gates import ChampionComparison, GateReport, check_gates, gates_table, load_metrics
from pipelines.config.model import Gates
from pipelines.errors import DetopsError
from tests.mutants.gates import no_regression_on_point_estimate

GATES = Gates(min_map50_95=0.5, max_dece_calibrated=0.1, max_latency_ms=50.0, max_map_regression=0.01)
GOOD = {"map50_95": 0.6, "dece_calibrated": 0.05, "latency_ms": 20.0}


def _comparison(delta: float, ci_low: float | None = None) -> ChampionComparison:
    ci_low = delta - 0.01 if ci_low is None else ci_low
    return ChampionComparison(champion_version="3", champion_map50_95=0.6 - delta, challenger_map50_95=0.6,
                              delta=delta, ci_low=ci_low, ci_high=2 * delta - ci_low, bootstrap_samples=200)


def _by_name(checks: list) -> dict:
    return {c.name: c for c in checks}


def test_all_pass_without_champion_notes_it() -> None:
    checks = _by_name(check_gates(GOOD, GATES, None))
    assert all(c.passed for c in checks.values())
    assert checks["no_regression"].value is None
    assert "no champion" in checks["no_regression"].note


@pytest.mark.parametrize(("name", "value"), [("map50_95", 0.49), ("dece_calibrated", 0.11), ("latency_ms", 51.0)])
def test_each_threshold_fails_alone(name: str, value: float) -> None:
    checks = _by_name(check_gates({**GOOD, name: value}, GATES, None))
    assert not checks[name].passed
    assert [c.name for c in checks.values() if not c.passed] == [name]


def test_thresholds_are_inclusive() -> None:
    edge = {"map50_95": 0.5, "dece_calibrated": 0.1, "latency_ms": 50.0}
    assert all(c.passed for c in check_gates(edge, GATES, None))


# (delta, CI lower end): the lower end decides, inclusive; a point estimate within the allowance does
# not pass when the interval reaches below it.
@pytest.mark.parametrize(("delta", "ci_low", "passed"), [
    (0.05, 0.03, True), (0.0, -0.01, True), (0.002, -0.0099, True),
    (-0.005, -0.025, False), (0.0, -0.0101, False), (-0.02, -0.04, False)])
def test_regression_against_champion_reads_the_ci_lower_end(delta: float, ci_low: float, passed: bool) -> None:
    check = _by_name(check_gates(GOOD, GATES, _comparison(delta, ci_low)))["no_regression"]
    assert check.passed is passed
    assert check.value == ci_low and check.threshold == -0.01
    assert "v3" in check.note and "CI" in check.note and "lower end is checked" in check.note


def check_no_regression_reads_the_lower_bound() -> None:
    """The guarantee, shared with the mutant test: a delta within the allowance whose interval reaches
    below it is refused (the loop's measured case: -0.018, CI [-0.034, -0.001], before at 0.03); one
    whose lower end holds passes."""
    gates = Gates(min_map50_95=0.0, max_dece_calibrated=1.0, max_latency_ms=1e4, max_map_regression=0.03)
    refused = _by_name(evaluation.gates.check_gates(GOOD, gates, _comparison(-0.018, -0.034)))["no_regression"]
    assert not refused.passed, refused
    held = _by_name(evaluation.gates.check_gates(GOOD, gates, _comparison(-0.018, -0.029)))["no_regression"]
    assert held.passed, held


def test_no_regression_reads_the_lower_bound() -> None:
    check_no_regression_reads_the_lower_bound()


def test_no_regression_on_the_point_estimate_is_caught() -> None:
    with no_regression_on_point_estimate(), pytest.raises(AssertionError, match="passed=True"):
        check_no_regression_reads_the_lower_bound()


def test_report_json_and_table(tmp_path: Path) -> None:
    comparison = _comparison(-0.03)
    report = GateReport("det", check_gates(GOOD, GATES, comparison), version="4", champion_before="3",
                        champion_after="3", comparison=comparison)
    assert not report.passed and not report.promoted
    report.write(tmp_path / "gates.json")
    data = json.loads((tmp_path / "gates.json").read_text())
    assert data["passed"] is False and data["promoted"] is False
    assert data["checks"]["no_regression"]["passed"] is False
    assert data["comparison"]["ci_low"] == pytest.approx(-0.04)

    console = Console(record=True, width=250)
    console.print(gates_table(report))
    text = console.export_text()
    assert "no_regression" in text and "fail" in text and "[-0.0400, -0.0200]" in text
    assert "champion not moved" in text


def test_promoted_only_when_champion_moves_to_the_version() -> None:
    checks = check_gates(GOOD, GATES, None)
    assert GateReport("det", checks, version="1", champion_before=None, champion_after="1").promoted
    assert not GateReport("det", checks, version="2", champion_before="1", champion_after="1").promoted


def test_load_metrics_maps_keys(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"map50_95": 0.4, "dece_calibrated": 0.02, "latency_ms_batch1": 7.5, "map50": 0.7}))
    assert load_metrics(path) == {"map50_95": 0.4, "dece_calibrated": 0.02, "latency_ms": 7.5}


def test_load_metrics_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DetopsError, match="metrics not found"):
        load_metrics(tmp_path / "missing.json")
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"map50_95": 0.4, "dece_calibrated": 0.02}))
    with pytest.raises(DetopsError, match="'latency_ms_batch1' is missing"):
        load_metrics(path)
    path.write_text("{not json")
    with pytest.raises(DetopsError, match="not valid JSON"):
        load_metrics(path)


# --------------------------------------------------------------------------- target slices
TARGETED = Gates(**{**GATES.model_dump(), "target_slices": ["dark"], "min_target_improvement": 0.05})


def _slice(ci_low: float) -> ChampionComparison:
    return ChampionComparison(champion_version="3", champion_map50_95=0.2, challenger_map50_95=0.4,
                              delta=ci_low + 0.05, ci_low=ci_low, ci_high=ci_low + 0.1, bootstrap_samples=200)


@pytest.mark.parametrize(("ci_low", "passed"), [(0.2, True), (0.05, True), (0.049, False), (-0.1, False)])
def test_target_slice_needs_the_ci_lower_end_above_the_margin(ci_low: float, passed: bool) -> None:
    checks = _by_name(check_gates(GOOD, TARGETED, _comparison(0.0), {"dark": _slice(ci_low)}))
    assert checks["improves/dark"].passed is passed
    assert checks["improves/dark"].value == ci_low and checks["improves/dark"].threshold == 0.05
    assert checks["no_regression"].passed  # the base split did not regress: only the target decides


def test_target_slice_gate_fails_even_when_the_base_improves() -> None:
    checks = _by_name(check_gates(GOOD, TARGETED, _comparison(0.1), {"dark": _slice(0.0)}))
    assert checks["no_regression"].passed and not checks["improves/dark"].passed


def test_target_slice_without_champion_passes_with_a_note_and_missing_comparison_is_an_error() -> None:
    check = _by_name(check_gates(GOOD, TARGETED, None))["improves/dark"]
    assert check.passed and "no champion" in check.note
    with pytest.raises(DetopsError, match="slice 'dark' has no champion comparison"):
        check_gates(GOOD, TARGETED, _comparison(0.0), {"other": _slice(0.2)})


def test_target_margin_must_be_positive_and_slice_names_valid() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_target_improvement"):
        Gates(min_target_improvement=0)
    with pytest.raises(ValidationError, match="target_slices"):
        Gates(target_slices=["bad name"])


def test_report_json_carries_the_slice_comparisons(tmp_path: Path) -> None:
    comparison = _comparison(0.0)
    slices = {"dark": _slice(0.1)}
    report = GateReport("m", check_gates(GOOD, TARGETED, comparison, slices), version="4", comparison=comparison,
                        slices=slices)
    report.write(tmp_path / "gates.json")
    data = json.loads((tmp_path / "gates.json").read_text())
    assert data["passed"] and data["slices"]["dark"]["ci_low"] == 0.1
    assert data["checks"]["improves/dark"]["passed"]


# --------------------------------------------------------------------------- the monitoring loop's gates
def check_loop_refuses_a_regression_its_interval_cannot_rule_out() -> None:
    """The loop's gates (params.yaml `loop:`, what `make loop-demo` runs) refuse a challenger that helps
    the target slice when the base split's interval reaches below -0.01: the default run measured before
    (0.678 -> 0.660, CI [-0.034, -0.001]) and a point estimate within the allowance (-0.004, CI [-0.020,
    +0.012]); a base split whose lower end holds passes."""
    from monitoring.loop import TARGET, loop_gates
    from pipelines.config.base import load_section
    from pipelines.config.monitoring import LoopConfig

    gates = loop_gates(load_section(LoopConfig), [TARGET])
    assert gates.max_map_regression == Gates().max_map_regression == 0.01  # the model gates' allowance
    metrics = {"map50_95": 0.66, "dece_calibrated": 0.2, "latency_ms": 30.0}
    target = {TARGET: ChampionComparison("1", 0.169, 0.563, 0.394, 0.357, 0.439, 500)}
    for delta, ci_low, passed in ((-0.018, -0.034, False), (-0.004, -0.020, False), (0.004, -0.009, True)):
        base = ChampionComparison("1", 0.678, 0.678 + delta, delta, ci_low, 2 * delta - ci_low, 500)
        checks = _by_name(evaluation.gates.check_gates(metrics, gates, base, target))
        assert checks[f"improves/{TARGET}"].passed
        assert checks["no_regression"].passed is passed, (delta, ci_low, checks["no_regression"])


def test_loop_refuses_a_regression_its_interval_cannot_rule_out() -> None:
    check_loop_refuses_a_regression_its_interval_cannot_rule_out()


def test_loop_gates_on_the_point_estimate_are_caught() -> None:
    with no_regression_on_point_estimate(), pytest.raises(AssertionError, match="passed=True"):
        check_loop_refuses_a_regression_its_interval_cannot_rule_out()
