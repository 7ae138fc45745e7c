"""`detops deploy`: blue/green on one machine behind nginx, driven by the registry's `@champion`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipelines.cli.common import user_errors
from pipelines.config.base import load_section
from pipelines.config.deploy import DeployConfig
from pipelines.config.serving import ServeConfig

deploy_app = typer.Typer(help="Blue/green deployment behind nginx: up, rollout, status, rollback, watch, down.",
                         no_args_is_help=True)


def _deployer():  # noqa: ANN202 (the type lives in a module imported lazily)
    from deploy.rollout import Deployer

    return Deployer(load_section(DeployConfig), load_section(ServeConfig))


def _print_notes(deployer) -> None:  # noqa: ANN001
    for note in deployer.notes:
        typer.secho(f"repair: {note}", fg=typer.colors.YELLOW)


@deploy_app.command()
@user_errors
def up() -> None:
    """Serve @champion behind the front door (deploy.port); returns once the front door answers."""
    deployer = _deployer()
    stack = deployer.up()
    _print_notes(deployer)
    typer.echo(f"live: v{stack.live_version} on {stack.live} since {stack.live_since}, front door {deployer.front_door}")


@deploy_app.command()
@user_errors
def rollout(version: Annotated[str, typer.Argument(help="registry version to roll out")]) -> None:
    """Roll VERSION out: start the idle colour, verify it (smoke, shadow/canary), switch; exit 4 when refused."""
    deployer = _deployer()
    result = deployer.rollout(version)
    _print_notes(deployer)
    typer.echo(f"v{result.version} is live on {result.colour} (rollout {result.id}, switch "
               f"{result.figures.get('switch_s')} s); v{result.from_version} stays warm for "
               f"{deployer.cfg.keep_previous_s:g} s; report {deployer.cfg.reports}/rollout-{result.id}.md")


@deploy_app.command()
@user_errors
def rollback(reason: Annotated[str, typer.Option(help="why, recorded with the rollback")] = "manual rollback") -> None:
    """Back to the previous version (instant while it is warm); @champion follows."""
    deployer = _deployer()
    result = deployer.rollback(reason=reason)
    _print_notes(deployer)
    how = f"switch {result.figures['switch_s']} s" if result.figures.get("warm") else "full rollout"
    typer.echo(f"v{result.version} is live again on {result.colour} ({how}); v{result.from_version} rolled back")


@deploy_app.command()
@user_errors
def status(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           last: Annotated[int, typer.Option(help="rollouts to list")] = 10) -> None:
    """The live colour and version since when, the previous one and whether it is warm, the last rollouts."""
    report = _deployer().status(last)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    live, previous = report["live"], report["previous"]
    console = Console()
    if live["colour"] is None:
        console.print("nothing deployed (detops deploy up)")
    else:
        warm = f"warm until {previous['retire_at']}" if previous["warm"] else "not running"
        console.print(f"front door {report['front_door']} (nginx {'up' if report['nginx']['running'] else 'DOWN'}): "
                      f"v{live['version']} on {live['colour']} since {live['since']}; previous "
                      f"v{previous['version'] or '-'} ({warm})")
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}")
    table = Table(title="rollouts")
    for column in ("id", "version", "from", "colour", "trigger", "started", "verdict", "reason"):
        table.add_column(column)
    for r in report["rollouts"]:
        colour = {"passed": "green", "refused": "red", "interrupted": "yellow"}.get(r["verdict"], "white")
        table.add_row(str(r["id"]), r["version"], r["from_version"] or "-", r["colour"], r["trigger"],
                      r["started_at"], f"[{colour}]{r['verdict']}[/{colour}]", r["reason"][:80])
    console.print(table)


@deploy_app.command()
@user_errors
def down() -> None:
    """Stop the front door and both colours (by PID), letting in-flight requests finish."""
    _deployer().down()
    typer.echo("stopped: front door and colours")


@deploy_app.command()
@user_errors
def watch(once: Annotated[bool, typer.Option(help="check once and exit (cron)")] = False,
          webhook: Annotated[bool | None, typer.Option(help="receive MLflow webhooks (default: when the tracking "
                                                            "store is an MLflow server)")] = None) -> None:
    """Follow serve.model_name@champion: roll out what becomes champion, roll back when it moves back."""
    from deploy.watch import Watcher

    Watcher(_deployer(), say=typer.echo).run(once=once, webhook=webhook)


@deploy_app.command(hidden=True)
@user_errors
def retire(colour: Annotated[str, typer.Argument(help="blue or green")],
           after: Annotated[float, typer.Option(help="seconds to wait first")] = 0.0) -> None:
    """Stop a warm previous colour once its keep-warm time is up (started detached by a switch)."""
    import time

    time.sleep(after)
    if _deployer().retire(colour):
        typer.echo(f"{colour} retired")
