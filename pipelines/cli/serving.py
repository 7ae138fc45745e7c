"""Serving verbs: build (registry version -> BentoML store -> bento)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.common import app, user_errors
from pipelines.config.base import load_section
from pipelines.config.serving import ServeConfig


@app.command(rich_help_panel="Serving")
@user_errors
def build(
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="import this local model folder "
                                                      "instead of the registry's serve.alias version")] = None,
    alias: Annotated[Optional[str], typer.Option(help="registry alias to serve (default serve.alias)")] = None,
    version: Annotated[Optional[str], typer.Option(help="registry version to serve (instead of an alias)")] = None,
    bento: Annotated[bool, typer.Option(help="also build the bento (--no-bento: import the model only)")] = True,
) -> None:
    """Import a model into BentoML's store (~/bentoml, or $BENTOML_HOME) and build the bento; then
    `bentoml serve serving.service:Detector` serves it."""
    from pipelines.errors import DetopsError
    from serving.build import build as run

    if sum(x is not None for x in (model_dir, alias, version)) > 1:
        raise DetopsError("build: give at most one of --model-dir, --alias and --version")
    cfg = load_section(ServeConfig, alias=alias)
    result = run(cfg, model_dir=model_dir, version=version, bento=bento)
    if model_dir is not None:
        source = "local folder"
    else:
        pinned = f" v{version}" if version else f"@{cfg.alias} v{result.labels['registry_version']}"
        source = cfg.model_name + pinned
    typer.echo(f"model {result.model_tag} ({source})" + (f"; bento {result.bento_tag}" if result.bento_tag else ""))
