"""The feedback loop with a real Label Studio server (installed into its own venv if missing),
real pushes, annotations, pull, retraining and registration."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.loop_demo import run_loop


@pytest.mark.integration
def test_feedback_loop_registers_a_challenger_tagged_with_the_batch(tmp_path: Path, mlflow_uri: str) -> None:
    result = run_loop(tmp_path)
    assert result.pushed == 24 and result.annotated == 24
    assert result.tags.get("detops.feedback_batch") == result.batch_id == "fb-loop-1"
    assert result.seconds < 600
