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

from pipelines.config import EvaluateConfig, Gates, RegisterConfig
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

    from evaluation.registry import alias_version, promote, register, rollback
    from serving.runtime import ModelCard

    name = "test-flow"
    client = MlflowClient()
    run_id = ModelCard.load(evaluated[0] / "model_card.json").run_id

    first = register(_cfg(name, evaluated, yolo_dataset, PASSING), EVALUATE)
    assert first.passed and first.promoted and first.version == "1" and first.comparison is None
    assert alias_version(client, name, "champion") == "1" == alias_version(client, name, "challenger")
    gates_json = json.loads((evaluated[1] / "gates.json").read_text())
    assert gates_json["passed"] is True and gates_json["promoted"] is True and gates_json["version"] == "1"
    assert "no champion" in gates_json["checks"]["no_regression"]["note"]

    # The monitoring loop marks training runs with detops.* tags: they reach the version.
    client.set_tag(run_id, "detops.feedback_batch", "batch-7")
    second = register(_cfg(name, evaluated, yolo_dataset, FAILING), EVALUATE)
    assert not second.passed and not second.promoted and second.version == "2"
    assert alias_version(client, name, "challenger") == "2"
    assert alias_version(client, name, "champion") == "1"  # a failed gate leaves the champion alone
    # Same model re-registered: the champion comparison ran on the same images and found no change.
    assert second.comparison is not None and second.comparison.champion_version == "1"
    assert second.comparison.delta == 0.0 and second.comparison.ci_low == 0.0 == second.comparison.ci_high
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.map50_95"] == "fail" and tags["gate.no_regression"] == "pass"
    assert tags["gates.passed"] == "false" and tags["detops.feedback_batch"] == "batch-7"
    assert tags["run_id"] == run_id and tags["dataset_hash"] == client.get_run(run_id).data.tags["dataset_hash"]
    assert float(tags["metric.map50_95"]) == pytest.approx(json.loads((evaluated[1] / "metrics.json").read_text())["map50_95"], abs=1e-6)
    assert json.loads((evaluated[1] / "gates.json").read_text())["champion_after"] == "1"
    # Each version is its own logged model in the training run.
    assert client.get_model_version(name, "1").source != client.get_model_version(name, "2").source

    assert promote(name, "2") == "1"
    assert alias_version(client, name, "champion") == "2"
    assert client.get_model_version(name, "2").tags["previous_champion"] == "1"

    assert rollback(name) == "1"
    assert alias_version(client, name, "champion") == "1"
    with pytest.raises(DetopsError, match="v1 has no previous champion"):
        rollback(name)
    with pytest.raises(DetopsError, match="no version 99"):
        promote(name, "99")
    with pytest.raises(DetopsError, match="version must be a number"):
        promote(name, "latest")


def test_rollback_without_champion_is_an_error(mlflow_uri: str) -> None:
    from evaluation.registry import rollback

    with pytest.raises(DetopsError, match="no champion to roll back"):
        rollback("test-never-registered")


def test_champion_pyfunc_predicts_like_the_runtime(evaluated: tuple[Path, Path], yolo_dataset: Path,
                                                   tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from evaluation.pyfunc_model import OUTPUT_COLUMNS
    from evaluation.registry import register
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


def test_cli_register_exits_zero_when_gates_fail(evaluated: tuple[Path, Path], yolo_dataset: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.config import PARAMS_ENV

    out = evaluated[1]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "evaluate": EVALUATE.model_dump(mode="json"),
        "register": _cfg("test-cli", evaluated, yolo_dataset, FAILING).model_dump(mode="json")}))
    monkeypatch.setenv(PARAMS_ENV, str(params))  # as --params does, undone after the test
    result = CliRunner().invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    assert "not promoted" in result.output
    assert json.loads((out / "gates.json").read_text())["promoted"] is False

    result = CliRunner().invoke(app, ["rollback"])
    assert result.exit_code == 1 and "no champion to roll back" in result.output


def test_mlflow_ui_serves_the_project_store(evaluated: tuple[Path, Path], yolo_dataset: Path) -> None:
    import signal
    import time

    import httpx

    from evaluation.registry import mlflow_ui_command, register
    from tests.serving_process import free_port

    register(_cfg("test-ui", evaluated, yolo_dataset, PASSING), EVALUATE)
    port = free_port()
    command = mlflow_ui_command("127.0.0.1", port)
    assert command[command.index("--backend-store-uri") + 1] == os.environ["MLFLOW_TRACKING_URI"]
    server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "mlflow-ui", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
            time.sleep(1)
        found = httpx.get(f"{base}/api/2.0/mlflow/registered-models/get", params={"name": "test-ui"}, timeout=10)
        assert found.status_code == 200
        assert {a["alias"] for a in found.json()["registered_model"]["aliases"]} == {"champion", "challenger"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=30)


def test_build_imports_the_champion_into_bentoml(evaluated: tuple[Path, Path], yolo_dataset: Path,
                                                 tmp_path: Path) -> None:
    """`detops build` resolves serve.alias in the registry, downloads that version and imports it into a
    (private) BentoML store, labelled with the registry name and version."""
    from evaluation.registry import register

    name = "test-build"
    report = register(_cfg(name, evaluated, yolo_dataset, PASSING), EVALUATE)
    assert report.promoted
    params = tmp_path / "params.yaml"
    params.write_text(f"serve: {{model_name: {name}, alias: champion}}\n")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    cli = [sys.executable, "-m", "pipelines.cli", "--params", str(params), "build", "--no-bento"]
    built = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    assert f"{name}@champion v{report.version}" in built.stdout

    script = ("import bentoml, json, pathlib; m = bentoml.models.get('" + name + ":latest'); "
              "print(json.dumps({'labels': m.info.labels, 'path': m.path}))")
    shown = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                           check=True)
    stored = json.loads(shown.stdout.strip().splitlines()[-1])
    assert stored["labels"]["registry_name"] == name and stored["labels"]["registry_version"] == report.version
    model_dir = evaluated[0]
    for file in ("model.onnx", "model_card.json", "calibrator.json"):
        assert (Path(stored["path"]) / file).read_bytes() == (model_dir / file).read_bytes(), file

    missing = subprocess.run([*cli[:-2], "build", "--alias", "nobody", "--no-bento"], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert missing.returncode == 1
    assert "no version of 'test-build' has the alias 'nobody'" in missing.stderr
