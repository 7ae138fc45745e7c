"""`python -m pipelines.cli` runs the `detops` CLI."""

from pipelines.cli.main import app

app()
