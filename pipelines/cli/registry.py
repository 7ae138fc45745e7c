"""Registry verbs: register (the gates), promote, rollback, mlflow-ui."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.common import app, user_errors
from pipelines.config.base import load_section
from pipelines.config.model import EvaluateConfig, QuantizeConfig, RegisterConfig


@app.command(rich_help_panel="Registry")
@user_errors
def register(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="evaluated model folder")] = None,
    evaluation: Annotated[Optional[Path], typer.Option(help="evaluate's report folder (metrics.json, coco_*.json)")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="registered model name")] = None,
) -> None:
    """Gate the evaluated model, register it as a new version (@challenger) and promote it to
    @champion when every gate passes. Failed gates exit 0: the verdict is in gates.json."""
    from evaluation.register import register as run

    cfg = load_section(RegisterConfig, model_dir=model_dir, evaluation=evaluation, model_name=model_name)
    run(cfg, load_section(EvaluateConfig), load_section(QuantizeConfig))


@app.command(rich_help_panel="Registry")
@user_errors
def promote(
    version: Annotated[str, typer.Argument(help="model version to make the champion")],
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="registered model name")] = None,
) -> None:
    """Point @champion at VERSION by hand (the previous champion is recorded for rollback)."""
    from pipelines.registry import promote as run

    name = load_section(RegisterConfig, model_name=model_name).model_name
    previous = run(name, version)
    typer.echo(f"{name}: @champion -> v{version} (was {f'v{previous}' if previous else 'none'})")


@app.command(rich_help_panel="Registry")
@user_errors
def rollback(
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="registered model name")] = None,
) -> None:
    """Point @champion back at the champion it replaced."""
    from pipelines.registry import rollback as run

    name = load_section(RegisterConfig, model_name=model_name).model_name
    current, previous = run(name)
    typer.echo(f"{name}: @champion -> v{previous} (rolled back from v{current})")


@app.command("mlflow-ui", rich_help_panel="Registry")
@user_errors
def mlflow_ui(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
) -> None:
    """Run the MLflow UI on the project's tracking store (runs, models, aliases)."""
    import subprocess

    from pipelines.errors import DetopsError
    from pipelines.tracking import mlflow_ui_command

    if not 0 < port < 65536:
        raise DetopsError(f"mlflow-ui: --port {port} is not a TCP port (1-65535)")
    command = mlflow_ui_command(host, port)
    typer.echo(f"MLflow UI on http://{host}:{port} (store {command[command.index('--backend-store-uri') + 1]})")
    code = subprocess.call(command)
    if code:
        raise typer.Exit(code)
