"""MLflow plumbing shared by train, tune, evaluate and register: one experiment per name, its
artifacts next to a SQLite store (never in a stray ./mlruns of the working directory)."""

from __future__ import annotations

import os
import re
import sys
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


def metric_name(name: str) -> str:
    """A name as MLflow accepts it: ultralytics' `metrics/mAP50-95(B)` -> `metrics/mAP50-95_B`, a
    class name with other characters likewise."""
    return re.sub(r"[^\w\-./ :]+", "_", name).strip("_")


def mlflow_ui_command(host: str, port: int) -> list[str]:
    """The `mlflow ui` command line on the project's tracking store, artifacts served from beside it."""
    uri = tracking_uri()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    artifacts = artifact_location(uri)
    if artifacts:  # new experiments created from the UI then keep their artifacts beside the database
        command += ["--artifacts-destination", artifacts]
    return command
