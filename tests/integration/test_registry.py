"""The registry round trip on a real MLflow SQLite store with a real tiny model: evaluate -> register
(gates, pyfunc version, aliases) -> promote -> rollback, and the registered pyfunc loaded back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config.model import EvaluateConfig, Gates, RegisterConfig
from pipelines.errors import DetopsError

pytestmark = pytest.mark.integration

PASSING = Gates(min_map50_95=0.0, max_dece_calibrated=1.0, max_latency_ms=10_000.0, max_map_regression=0.01,
                bootstrap_samples=50, seed=0)
FAILING = PASSING.model_copy(update={"min_map50_95": 1.0})  # a tiny model never reaches mAP 1
EVALUATE = EvaluateConfig(latency_batch_sizes=[1, 2], latency_repeats=2, experiment="tests")


@pytest.fixture(scope="module")
def evaluated(trained_model_dir: Path, yolo_dataset: Path, mlflow_uri: str,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the session's tiny model, evaluated by the project's evaluate(): (model dir, report dir)."""
    from evaluation.evaluate import evaluate

    root = tmp_path_factory.mktemp("registry")
    model_dir = Path(shutil.copytree(trained_model_dir, root / "models"))
    out = root / "evaluate"
    evaluate(EVALUATE.model_copy(update={"model_dir": model_dir, "dataset": yolo_dataset, "out": out}))
    return model_dir, out


def _cfg(name: str, evaluated: tuple[Path, Path], dataset: Path, gates: Gates) -> RegisterConfig:
    model_dir, out = evaluated
    return RegisterConfig(model_name=name, model_dir=model_dir, evaluation=out, dataset=dataset, gates=gates)


def test_register_gates_aliases_promote_rollback(evaluated: tuple[Path, Path], yolo_dataset: Path) -> None:
    from mlflow import MlflowClient

    from evaluation.register import register
    from pipelines.registry import alias_version, promote, rollback
    from serving.runtime import ModelCard

    name = "test-flow"
    client = MlflowClient()
    run_id = ModelCard.load(evaluated[0] / "model_card.json").run_id

    first = register(_cfg(name, evaluated, yolo_dataset, PASSING), EVALUATE)
    assert first.passed and first.promoted and first.version == "1" and first.comparison is None
    assert alias_version(name, "champion") == "1" == alias_version(name, "challenger")
    gates_json = json.loads((evaluated[1] / "gates.json").read_text())
    assert gates_json["passed"] is True and gates_json["promoted"] is True and gates_json["version"] == "1"
    assert "no champion" in gates_json["checks"]["no_regression"]["note"]

    # The monitoring loop marks training runs with detops.* tags: they reach the version.
    client.set_tag(run_id, "detops.feedback_batch", "batch-7")
    second = register(_cfg(name, evaluated, yolo_dataset, FAILING), EVALUATE)
    assert not second.passed and not second.promoted and second.version == "2"
    assert alias_version(name, "challenger") == "2"
    assert alias_version(name, "champion") == "1"  # a failed gate leaves the champion alone
    # Same model re-registered: the champion comparison ran on the same images and found no change.
    assert second.comparison is not None and second.comparison.champion_version == "1"
    assert second.comparison.delta == 0.0 and second.comparison.ci_low == 0.0 == second.comparison.ci_high
    version = client.get_model_version(name, "2")
    tags = version.tags
    # Few tags (verdict, provenance, the run's detops.* tags); the gate table is the description.
    assert tags["gates.passed"] == "false" and tags["detops.feedback_batch"] == "batch-7"
    assert tags["run_id"] == run_id and tags["dataset_hash"] == client.get_run(run_id).data.tags["dataset_hash"]
    assert not [k for k in tags if k.startswith(("gate.", "metric."))] and len(tags) <= 6
    map50_95 = json.loads((evaluated[1] / "metrics.json").read_text())["map50_95"]
    assert "| map50_95 |" in version.description and "| FAIL |" in version.description
    assert f"mAP@.5:.95 {map50_95:.4g}" in version.description and "vs champion v1" in version.description
    assert json.loads((evaluated[1] / "gates.json").read_text())["champion_after"] == "1"
    # Each version is its own logged model in the training run.
    assert client.get_model_version(name, "1").source != client.get_model_version(name, "2").source

    assert promote(name, "2") == "1"
    assert alias_version(name, "champion") == "2"
    assert client.get_model_version(name, "2").tags["previous_champion"] == "1"

    assert rollback(name) == ("2", "1")
    assert alias_version(name, "champion") == "1"
    with pytest.raises(DetopsError, match="v1 has no previous champion"):
        rollback(name)
    assert client.get_model_version(name, "2").tags["rolled_back"] == "manual rollback"
    with pytest.raises(DetopsError, match="no version 99"):
        promote(name, "99")
    with pytest.raises(DetopsError, match="version must be a number"):
        promote(name, "latest")


def test_rollback_without_champion_is_an_error(mlflow_uri: str) -> None:
    from pipelines.registry import rollback

    with pytest.raises(DetopsError, match="no champion to roll back"):
        rollback("test-never-registered")


def test_champion_pyfunc_predicts_like_the_runtime(evaluated: tuple[Path, Path], yolo_dataset: Path,
                                                   tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from evaluation.pyfunc_model import OUTPUT_COLUMNS
    from evaluation.register import register
    from pipelines.images import read_rgb
    from serving.runtime import ModelRuntime

    name = "test-pyfunc"
    register(_cfg(name, evaluated, yolo_dataset, PASSING), EVALUATE)
    paths = sorted((yolo_dataset / "images" / "test").iterdir())[:4]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    frame = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}), params={"conf": 0.001})

    assert list(frame.columns) == OUTPUT_COLUMNS
    expected = ModelRuntime.load(evaluated[0]).predict([read_rgb(p) for p in paths], conf=0.001)
    assert len(frame) == sum(len(d) for d in expected) > 0
    flat = [(i, d) for i, dets in enumerate(expected) for d in dets]
    assert frame["image_index"].tolist() == [i for i, _ in flat]
    assert frame["confidence"].tolist() == pytest.approx([d.confidence for _, d in flat])
    assert frame["x2"].tolist() == pytest.approx([d.box.x2 for _, d in flat])
    assert set(frame["class_name"]) <= set(model.unwrap_python_model().runtime.class_names)

    with pytest.raises(DetopsError, match="image row 0 cannot be decoded"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))

    # The logged code is enough: a fresh interpreter, outside the repository, imports the runtime
    # from the model's own code folder.
    script = (f"import mlflow, pandas as pd; m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
              f"out = m.predict(pd.DataFrame({{'image': [open({str(paths[0])!r}, 'rb').read()]}})); "
              "import serving.runtime as r; print(r.__file__); print(list(out.columns))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runtime_file, columns = done.stdout.strip().splitlines()[-2:]
    assert runtime_file.endswith("/code/serving/runtime.py")
    assert not runtime_file.startswith(str(Path(__file__).resolve().parents[2]))
    assert columns == str(OUTPUT_COLUMNS)


def test_slices_are_evaluated_logged_and_a_target_slice_must_improve(
        trained_model_dir: Path, yolo_dataset: Path, mlflow_uri: str, tmp_path: Path) -> None:
    """The val split stands in for a slice: evaluate gives its COCO metrics, the plot and
    `map50_95/<slice>` on the run; re-registering the same model as challenger leaves the slice's mAP
    unchanged (CI [0, 0]), so the target-slice gate refuses it and the champion stays."""
    from mlflow import MlflowClient

    from evaluation.coco import coco_metrics
    from evaluation.evaluate import evaluate
    from evaluation.register import register
    from pipelines.registry import alias_version
    from serving.runtime import ModelCard

    model_dir = Path(shutil.copytree(trained_model_dir, tmp_path / "models"))
    out = tmp_path / "evaluate"
    evaluate_cfg = EvaluateConfig(**{**EVALUATE.model_dump(exclude={"slices"}), "model_dir": model_dir,
                                     "dataset": yolo_dataset, "out": out,
                                     "slices": {"valslice": {"dataset": yolo_dataset, "split": "val"}}})
    metrics = evaluate(evaluate_cfg)
    sliced = metrics["slices"]["valslice"]
    gt = json.loads((out / "slices" / "valslice" / "coco_gt.json").read_text())
    dt = json.loads((out / "slices" / "valslice" / "coco_dt.json").read_text())
    assert sliced["n_images"] == len(list((yolo_dataset / "images" / "val").iterdir())) == len(gt["images"])
    assert sliced["map50_95"] == pytest.approx(coco_metrics(gt, dt).map50_95)
    assert (out / "slices.png").stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text())["slices"]["valslice"]["split"] == "val"
    run = MlflowClient().get_run(ModelCard.load(model_dir / "model_card.json").run_id)
    assert run.data.metrics["map50_95/valslice"] == pytest.approx(sliced["map50_95"])
    assert run.data.metrics["map50_95/base"] == pytest.approx(metrics["map50_95"])

    name = "test-slices"
    gates = PASSING.model_copy(update={"target_slices": ["valslice"], "min_target_improvement": 0.01})
    cfg = RegisterConfig(model_name=name, model_dir=model_dir, evaluation=out, dataset=yolo_dataset, gates=gates)
    first = register(cfg, evaluate_cfg)
    assert first.promoted and "no champion" in {c.name: c for c in first.checks}["improves/valslice"].note
    second = register(cfg, evaluate_cfg)
    check = {c.name: c for c in second.checks}["improves/valslice"]
    assert not check.passed and check.value == 0.0 and not second.promoted
    assert {c.name for c in second.checks if not c.passed} == {"improves/valslice"}
    assert alias_version(name, "champion") == "1" and alias_version(name, "challenger") == "2"
    saved = json.loads((out / "gates.json").read_text())
    assert saved["slices"]["valslice"]["delta"] == 0.0
    assert (out / "slices_vs_champion.png").stat().st_size > 0

    with pytest.raises(DetopsError, match=r"target_slices \['typo'\] are not in evaluate.slices"):
        register(cfg.model_copy(update={"gates": gates.model_copy(update={"target_slices": ["typo"]})}),
                 evaluate_cfg)
