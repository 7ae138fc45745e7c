"""The monitoring loop closed with evidence, at tiny sizes, with real components: the deployment stack
(nginx + blue/green BentoML colours), a real Label Studio server, real training, evaluation with the
target slice, the gates and the watcher's rollout (monitoring/loop.py; `make loop-demo` runs it at
demo size). One run, both endings: a challenger from too few labels is refused by the target-slice gate
and the champion stays live; the challenger from the whole batch is better on the shifted slice and rolls
out; the drift report then reads the new version's records only, and fewer of the model's output
summaries drift than before (measured at these sizes: 1.00 -> 0.38; the image statistics of `night`
images drift by nature, see docs/monitoring.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_the_loop_pays_off_only_with_enough_labels(loop_base, tmp_path: Path) -> None:
    from monitoring.loop import run_loop

    cfg, base = loop_base
    cfg = cfg.model_copy(update={"work": tmp_path / "work", "out": tmp_path / "out", "model_name": "loop-test"})
    lines: list[str] = []
    result = run_loop(cfg, base, say=lines.append)
    story = "\n".join(lines)

    m = result.map50_95
    assert m["base"]["before"] >= 0.3, story  # the evidence starts from a real model, not a mAP-0 one
    assert result.pushed == result.annotated == cfg.labels and result.held_out > 0 and result.trained_on > 0
    assert result.drift["before"].detected and result.drift["before"].version == result.champion_before

    # The whole batch: the gates passed with the target slice's CI lower end above the margin and no
    # regression on the base split.
    assert result.gates_passed, story
    assert result.gate_checks["improves/feedback"]["value"] >= cfg.min_target_improvement
    assert m["target"]["after"] > m["target"]["before"] + cfg.min_target_improvement
    assert m["base"]["after"] >= m["base"]["before"] - cfg.max_map_regression
    # The watcher rolled the new champion out blue/green; the after window is its records only.
    assert result.rollout["verdict"] == "passed" and result.rollout["version"] == result.challenger, story
    assert result.live_after == result.challenger == result.drift["after"].version

    # The same recipe from too few labels: the target-slice gate refuses it, the new champion stays live.
    few = result.refused
    assert few["trained_on"] == cfg.few_labels and few["held_out"] == result.held_out  # the same slice
    assert not few["gates_passed"] and not few["checks"]["improves/feedback"]["passed"], story
    assert few["live_after"] == few["champion_before"] == few["champion_after"] == result.challenger
    before, after = result.drift["before"], result.drift["after"]
    assert before.window == after.window == cfg.traffic  # the after window: the new version's records only
    assert before.prediction_drifted_share is not None and after.prediction_drifted_share is not None
    assert after.prediction_drifted_share < before.prediction_drifted_share, story
    assert "brightness" in after.drifted, story  # the images are still night images: that cannot calm down

    summary = json.loads((cfg.out / "summary.json").read_text())
    for path in ("map50_95.base.before", "map50_95.base.after", "map50_95.target.before", "map50_95.target.after",
                 "gates_passed", "rollout.version", "rollout.verdict", "drift.before.prediction_drifted_share",
                 "drift.after.prediction_drifted_share"):
        node = summary
        for key in path.split("."):
            node = node[key]
        assert node is not None, path
    assert summary["rollout"]["verdict"] == "passed" and summary["gates_passed"] is True
    markdown = (cfg.out / "summary.md").read_text()
    assert "![" in markdown and "stayed live" in markdown
    for plot in ("map_slices.png", "drift_features.png"):
        assert (cfg.out / plot).stat().st_size > 0, plot
