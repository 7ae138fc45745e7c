"""The data stages run through `dvc repro` in a temporary copy of the repository, twice: the second
run must find everything up to date and run nothing."""

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


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dvc.yaml, the code it depends on and tiny params, in a fresh git + DVC repository."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    for package in CODE:
        shutil.copytree(PROJECT_ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["synthesize"].update(n_images=40, min_side=96, max_side=160)
    params["validate"]["min_instances_per_class"] = {"train": 1, "val": 1, "test": 1}
    params["augment"]["copies"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert _dvc(["init", "-q"], root).returncode == 0
    return root


def test_data_stages_run_then_stay_up_to_date(repo_copy: Path) -> None:
    first = _dvc(["repro", "augment"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("synthesize", "ingest", "validate", "augment"):
        assert f"Running stage '{stage}'" in first.stdout

    dataset = repo_copy / "data" / "dataset"
    assert (dataset / "dataset.yaml").exists() and (dataset / "ingest_report.json").exists()
    for split in ("train", "val", "test"):
        assert any((dataset / "images" / split).iterdir())
    augmented_train = list((repo_copy / "data" / "augmented" / "images" / "train").iterdir())
    assert len(augmented_train) == 2 * len(list((dataset / "images" / "train").iterdir()))
    assert json.loads((repo_copy / "reports" / "validate" / "summary.json").read_text())["success"] is True
    assert (repo_copy / "reports" / "augment" / "preview.png").stat().st_size > 0
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"synthesize", "ingest", "validate", "augment"}

    second = _dvc(["repro", "augment"], repo_copy)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    status = _dvc(["status"], repo_copy)
    assert "up to date" in status.stdout, status.stdout
