"""The `detops` command: the app of `pipelines.cli.common` with every verb module registered, in the
order of the lifecycle."""

# isort: off
from pipelines.cli import data, model, registry, serving, jobs, monitoring, access  # noqa: F401 (each registers its verbs)
from pipelines.cli.common import app
from pipelines.cli.deploy import deploy_app
# isort: on

app.add_typer(jobs.batch, name="batch", rich_help_panel="Serving")
app.add_typer(deploy_app, name="deploy", rich_help_panel="Deployment")
app.add_typer(access.keys, name="keys", rich_help_panel="Serving")

__all__ = ["app"]

if __name__ == "__main__":
    app()
