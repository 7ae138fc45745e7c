"""The whole training pipeline runs through `dvc repro` in a temporary copy of the repository at tiny
sizes, twice: the second run must find everything up to date and run nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.environment import PROJECT_ROOT

pytestmark = pytest.mark.integration

CODE = ("labeling", "training", "evaluation", "serving", "monitoring", "pipelines")


STAGES = ("synthesize", "ingest", "validate", "augment", "train", "quantize", "evaluate", "evaluate_int8", "register")


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dvc.yaml, the code it depends on and tiny params, in a fresh git + DVC repository."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    for package in CODE:
        shutil.copytree(PROJECT_ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["synthesize"].update(n_images=40, min_side=96, max_side=160)
    params["validate"]["min_instances_per_class"] = {"train": 1, "val": 1, "test": 1}
    params["augment"]["copies"] = 1
    params["train"].update(imgsz=64, epochs=1, batch=8, workers=0)
    params["evaluate"].update(latency_batch_sizes=[1, 2], latency_repeats=2)
    params["register"]["gates"]["bootstrap_samples"] = 50
    params["quantize"]["calibration_images"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert _dvc(["init", "-q"], root).returncode == 0
    return root


def test_pipeline_runs_then_stays_up_to_date(repo_copy: Path) -> None:
    first = _dvc(["repro"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    dataset = repo_copy / "data" / "dataset"
    assert (dataset / "dataset.yaml").exists() and (dataset / "ingest_report.json").exists()
    for split in ("train", "val", "test"):
        assert any((dataset / "images" / split).iterdir())
    augmented_train = list((repo_copy / "data" / "augmented" / "images" / "train").iterdir())
    assert len(augmented_train) == 2 * len(list((dataset / "images" / "train").iterdir()))
    assert json.loads((repo_copy / "reports" / "validate" / "summary.json").read_text())["success"] is True
    assert (repo_copy / "reports" / "augment" / "preview.png").stat().st_size > 0
    metrics = json.loads((repo_copy / "reports" / "evaluate" / "metrics.json").read_text())
    assert 0 <= metrics["map50_95"] <= 1
    gates = json.loads((repo_copy / "reports" / "evaluate" / "gates.json").read_text())
    assert gates["version"] == "1" and gates["passed"] is False  # one epoch at imgsz 64 cannot pass
    # The variant gate compared the fp32 model with its int8 copy, both evaluated.
    assert gates["variant"]["chosen"] in ("fp32", "int8") and gates["variant"]["int8"]["map50_95"] is not None
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    # Training wrote its label caches into data/augmented: .dvcignore keeps that from counting.
    assert list((repo_copy / "data" / "augmented" / "labels").glob("*.cache"))
    second = _dvc(["repro"], repo_copy)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    status = _dvc(["status", "dvc.yaml"], repo_copy)
    assert "up to date" in status.stdout, status.stdout
