"""`detops tune`: an Optuna study over the search space of `tune.space`, every trial a real training
through `training.train.train` (so a trial is exactly what `detops train` would do with those values).

- Trials train `tune.epochs` epochs into a temporary folder (never `models/`) and report the
  validation mAP50-95 of every epoch to Optuna; the MedianPruner stops unpromising trials early.
- Each trial's MLflow run is a child (tag `mlflow.parentRunId`) of one parent run per `detops tune`
  invocation, in the experiment `tune.experiment`.
- The study lives in `tune.storage` (SQLite by default, any SQLAlchemy URL works) and is opened with
  `load_if_exists=True`: several machines running `detops tune` on one database share the study.
- The best trial's values are written to `tune.out` in the shape of params.yaml's `train:` section.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config.base import override
from pipelines.config.model import SearchDim, TrainConfig, TuneConfig
from pipelines.errors import DetopsError

VAL_METRIC = "metrics/mAP50-95(B)"  # ultralytics' validation mAP50-95, the objective
# Fields of `train:` a trial sets itself; searching them makes no sense.
_FIXED = {"dataset", "out", "runs", "report", "experiment", "epochs", "hyp", "device", "workers"}


@dataclass(frozen=True)
class TuneResult:
    """The study after this invocation: its best trial and where the best params were written."""

    study_name: str
    n_trials: int  # all trials of the study, including other machines'
    best_value: float
    best_params: dict[str, Any]
    parent_run_id: str
    out: Path


def tune(cfg: TuneConfig, train_cfg: TrainConfig) -> TuneResult:
    """Run `cfg.n_trials` trials (or until `cfg.timeout_s`) and write the best params to `cfg.out`."""
    from pipelines import environment

    environment.configure_ultralytics()
    train_keys, hyp_keys = split_space(cfg.space)
    storage_label = _redacted(cfg.storage)  # also refuses a malformed URL before any work
    import optuna
    from mlflow import MlflowClient

    from pipelines.tracking import ensure_experiment

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=cfg.study_name, storage=_storage(cfg.storage), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs))
    client = MlflowClient()
    parent = client.create_run(ensure_experiment(cfg.experiment), run_name=f"tune {cfg.study_name}",
                               tags={"optuna.study_name": cfg.study_name})
    parent_id = parent.info.run_id
    client.log_param(parent_id, "space", json.dumps({k: v.model_dump(exclude_none=True) for k, v in cfg.space.items()}))
    client.log_param(parent_id, "epochs_per_trial", cfg.epochs)
    client.log_param(parent_id, "storage", storage_label)
    status = "FAILED"
    try:
        objective = _objective(cfg, train_cfg, train_keys, hyp_keys, parent_id, client)
        study.optimize(objective, n_trials=cfg.n_trials, timeout=cfg.timeout_s, gc_after_trial=True)
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            raise DetopsError(f"study {cfg.study_name}: no trial completed (all pruned or failed)")
        best = study.best_trial
        write_best_params(cfg.out, best.params, train_keys, train_cfg, study.study_name, best.value, best.number)
        client.log_metric(parent_id, "best_value", best.value)
        client.set_tag(parent_id, "best_trial", str(best.number))
        client.set_tag(parent_id, "best_run_id", str(best.user_attrs.get("mlflow_run_id", "")))
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return TuneResult(cfg.study_name, len(study.trials), best.value, dict(best.params), parent_id, cfg.out)


def split_space(space: dict[str, SearchDim]) -> tuple[set[str], set[str]]:
    """(keys that are `train:` fields, keys that are ultralytics train arguments for `train.hyp`)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    if not space:
        raise DetopsError("tune.space: empty (declare at least one parameter to search)")
    train_keys, hyp_keys = set(), set()
    for key in space:
        if key in _FIXED:
            raise DetopsError(f"tune.space.{key}: set by detops tune, not searchable")
        if key in TrainConfig.model_fields:
            train_keys.add(key)
        elif key in DEFAULT_CFG_DICT:
            hyp_keys.add(key)
        else:
            raise DetopsError(f"tune.space.{key}: neither a train param nor an ultralytics train argument")
    return train_keys, hyp_keys


def suggest(trial: Any, space: dict[str, SearchDim]) -> dict[str, Any]:
    """One value per dimension of `space` from an Optuna trial."""
    values = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def write_best_params(path: Path, params: dict[str, Any], train_keys: set[str], train_cfg: TrainConfig,
                      study_name: str, value: float, number: int) -> None:
    """`train:` section YAML with the best values (hyp merged over the current `train.hyp`)."""
    section: dict[str, Any] = {k: v for k, v in params.items() if k in train_keys}
    hyp = {k: v for k, v in params.items() if k not in train_keys}
    if hyp:
        section["hyp"] = {**train_cfg.hyp, **hyp}
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best trial {number} of Optuna study {study_name!r}: validation mAP50-95 {value:.4f}.\n"
              "# Merge into params.yaml's train: section.\n")
    path.write_text(header + yaml.safe_dump({"train": section}, sort_keys=False))


def _objective(cfg: TuneConfig, train_cfg: TrainConfig, train_keys: set[str], hyp_keys: set[str],
               parent_id: str, client: Any) -> Callable[[Any], float]:
    import optuna

    from pipelines.tracking import metric_name
    from training.train import train

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, cfg.space)
        with tempfile.TemporaryDirectory(prefix="detops-tune-") as tmp:
            root = Path(tmp)
            trial_cfg = override(
                train_cfg, epochs=cfg.epochs, out=root / "models", runs=root / "runs",
                report=root / "report", experiment=cfg.experiment,
                hyp={**train_cfg.hyp, **{k: values[k] for k in hyp_keys}}, **{k: values[k] for k in train_keys})
            pruned: list[int] = []

            def report(trainer: Any) -> None:
                value = trainer.metrics.get(VAL_METRIC)
                if value is None:
                    return
                trial.report(float(value), step=trainer.epoch)
                if trial.should_prune():
                    pruned.append(trainer.epoch)
                    trainer.stop = True  # ultralytics ends training after this epoch, cleanly

            with _epoch_callback(report):
                result = train(trial_cfg)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        client.set_tag(result.run_id, "mlflow.parentRunId", parent_id)  # shows as nested in the UI
        client.set_tag(result.run_id, "optuna.trial", str(trial.number))
        if pruned:
            client.set_tag(result.run_id, "optuna.pruned_at_epoch", str(pruned[0]))
            raise optuna.TrialPruned(f"pruned after epoch {pruned[0]}")
        return result.metrics[metric_name(VAL_METRIC)]

    return objective


@contextmanager
def _epoch_callback(fn: Callable[[Any], None]) -> Iterator[None]:
    """Register `fn` as an ultralytics `on_fit_epoch_end` callback for the models created inside the
    block: ultralytics copies its default callbacks into every new model, and train() builds its
    model inside, so this is how a trial sees every epoch without a hook in train()."""
    from ultralytics.utils.callbacks.base import default_callbacks

    default_callbacks["on_fit_epoch_end"].append(fn)
    try:
        yield
    finally:
        default_callbacks["on_fit_epoch_end"].remove(fn)


def _storage(url: str) -> str:
    """The storage URL, with the folder of a relative SQLite file created."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url


def _redacted(url: str) -> str:
    """A storage URL safe to log (password hidden)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise DetopsError(f"tune.storage: not a database URL (got {url!r})") from None
