"""The monitoring loop closed with evidence, at tiny sizes, with real components: the deployment stack
(nginx + blue/green BentoML colours), a real Label Studio server, real training, evaluation with the
target slice, the gates and the watcher's rollout (monitoring/loop.py; `make loop-demo` runs it at
demo size). Two endings: enough labels -> the challenger is better on the drifted slice, rolls out, and
the drift on the model's outputs calms down; too few labels -> the gate refuses it, the champion stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(loop_base, tmp_path: Path, name: str, labels: int):  # noqa: ANN001, ANN202
    from monitoring.loop import run_loop

    cfg, base = loop_base
    cfg = cfg.model_copy(update={"work": tmp_path / "work", "out": tmp_path / "out", "model_name": name,
                                 "labels": labels})
    lines: list[str] = []
    return run_loop(cfg, base, say=lines.append), cfg, lines


def test_enough_labels_pay_off_gates_rollout_and_calmer_drift(loop_base, tmp_path: Path) -> None:
    result, cfg, lines = _run(loop_base, tmp_path, "loop-pays-off", labels=40)
    story = "\n".join(lines)
    m = result.map50_95
    assert m["base"]["before"] >= 0.3, story  # the evidence starts from a real model, not a mAP-0 one
    assert result.pushed == result.annotated == 40 and result.held_out > 0 and result.trained_on > 0
    assert result.drift["before"].detected and result.drift["before"].version == result.champion_before
    # The gates passed because the target slice improved (CI lower end >= margin) without a regression.
    checks = result.gate_checks
    assert result.gates_passed, story
    assert checks["improves/feedback"]["value"] >= cfg.min_target_improvement
    assert m["target"]["after"] > m["target"]["before"] + cfg.min_target_improvement
    assert m["base"]["after"] >= m["base"]["before"] - cfg.max_map_regression
    # The watcher rolled the new champion out blue/green; the after window is its records only.
    assert result.rollout["verdict"] == "passed" and result.rollout["version"] == result.challenger, story
    assert result.live_after == result.challenger == result.drift["after"].version
    before, after = result.drift["before"], result.drift["after"]
    assert after.prediction_drifted_share < before.prediction_drifted_share, story
    assert "brightness" in after.drifted  # dark images stay dark: image statistics still drift

    summary = json.loads((cfg.out / "summary.json").read_text())
    for path in ("map50_95.base.before", "map50_95.base.after", "map50_95.target.before", "map50_95.target.after",
                 "gates_passed", "rollout.version", "rollout.verdict", "drift.before.prediction_drifted_share",
                 "drift.after.prediction_drifted_share"):
        node = summary
        for key in path.split("."):
            node = node[key]
        assert node is not None, path
    markdown = (cfg.out / "summary.md").read_text()
    assert "![" in markdown and (cfg.out / "map_slices.png").stat().st_size > 0
    assert (cfg.out / "drift_features.png").stat().st_size > 0


def test_too_few_labels_are_refused_by_the_gate_and_the_champion_stays_live(loop_base, tmp_path: Path) -> None:
    result, _, lines = _run(loop_base, tmp_path, "loop-too-few", labels=5)
    story = "\n".join(lines)
    assert result.annotated == 5 and result.held_out >= 1
    assert not result.gates_passed and not result.gate_checks["improves/feedback"]["passed"], story
    assert result.rollout["verdict"] == "not run" and result.rollout["version"] is None
    assert result.live_after == result.champion_before != result.challenger  # the champion stayed live
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gates_passed"] is False and summary["live_after"] == result.champion_before
