"""MLflow plumbing shared by train, tune, evaluate and register: one experiment per name, its
artifacts next to a SQLite store (never in a stray ./mlruns of the working directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipelines.environment import default_tracking_uri


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a server, a database), else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside the database file; servers choose their own."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db_path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path keeps its leading slash
    return (db_path.resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(name: str) -> str:
    """Set (creating if needed) the active experiment and return its id."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def resume_run(run_id: str) -> Any:
    """`mlflow.start_run(run_id=...)` for an existing run, whatever experiment is active in this
    process (MLflow refuses to resume a run of another experiment than the active one)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow.start_run(run_id=run_id)
