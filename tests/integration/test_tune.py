"""`detops tune` for real: Optuna trials that train through training.train (imgsz 64, 1 epoch), a SQLite
study shared across invocations, nested MLflow runs and the best-params YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config.base import override
from pipelines.config.model import SearchDim, TrainConfig, TuneConfig
from pipelines.errors import DetopsError

SPACE = {
    "lr0": SearchDim(type="float", low=1e-4, high=1e-2, log=True),
    "model": SearchDim(type="categorical", choices=["yolov8n.yaml", "yolo11n.yaml"]),
    "mosaic": SearchDim(type="float", low=0.0, high=1.0),  # an ultralytics hyp, not a train: field
}


@pytest.mark.integration
def test_study_trials_nested_runs_and_best_params(yolo_dataset: Path, mlflow_uri: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from mlflow import MlflowClient

    from training.tune import tune

    monkeypatch.chdir(tmp_path)  # train's default out is ./models: tune must leave it alone
    train_cfg = TrainConfig(dataset=yolo_dataset, imgsz=64, batch=8, workers=0, hyp={"fliplr": 0.0})
    storage = f"sqlite:///{tmp_path / 'optuna' / 'study.db'}"
    cfg = TuneConfig(n_trials=2, epochs=1, study_name="test-study", storage=storage, out=tmp_path / "best.yaml",
                     experiment="tests-tune", seed=3, space=SPACE)

    result = tune(cfg, train_cfg)

    study = optuna.load_study(study_name="test-study", storage=storage)
    assert len(study.trials) == result.n_trials == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(set(t.params) == set(SPACE) for t in study.trials)
    assert result.best_value == study.best_value and result.best_params == study.best_params
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in study.trials)
    for child in children:  # each child is a full training run logged by train()
        trial = next(t for t in study.trials if t.user_attrs["mlflow_run_id"] == child.info.run_id)
        assert float(child.data.params["lr0"]) == pytest.approx(trial.params["lr0"])
        assert child.data.params["model"] == trial.params["model"]
        assert "metrics/mAP50-95_B" in child.data.metrics
    assert parent.data.tags["best_run_id"] in {r.info.run_id for r in children}

    best = yaml.safe_load(cfg.out.read_text())
    section = best["train"]
    assert section["lr0"] == study.best_params["lr0"] and section["model"] == study.best_params["model"]
    assert section["hyp"] == {"fliplr": 0.0, "mosaic": study.best_params["mosaic"]}
    assert override(train_cfg, **section).hyp["mosaic"] == study.best_params["mosaic"]  # merges cleanly

    # Another invocation (another machine) on the same storage continues the same study.
    again = tune(cfg.model_copy(update={"n_trials": 1}), train_cfg)
    assert again.n_trials == 3 and len(optuna.load_study(study_name="test-study", storage=storage).trials) == 3


@pytest.mark.parametrize(("key", "message"), [
    ("no_such_arg", "neither a train param nor an ultralytics train argument"),
    ("epochs", "set by detops tune"),
])
def test_space_keys_are_checked_before_training(key: str, message: str, tmp_path: Path) -> None:
    from training.tune import tune

    cfg = TuneConfig(storage=f"sqlite:///{tmp_path / 's.db'}", space={key: SearchDim(type="float", low=0, high=1)})
    with pytest.raises(DetopsError, match=f"tune.space.{key}: {message}"):
        tune(cfg, TrainConfig())
    assert not (tmp_path / "s.db").exists()


def test_bad_storage_url_is_refused(tmp_path: Path) -> None:
    from training.tune import tune

    with pytest.raises(DetopsError, match="tune.storage: not a database URL"):
        tune(TuneConfig(storage="not a url"), TrainConfig())


def test_search_dim_validation() -> None:
    with pytest.raises(ValueError, match="needs a non-empty 'choices'"):
        SearchDim(type="categorical")
    with pytest.raises(ValueError, match="needs 'low' <= 'high'"):
        SearchDim(type="float", low=1.0, high=0.1)
