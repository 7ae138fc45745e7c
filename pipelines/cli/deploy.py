"""`detops deploy`: blue/green on one machine behind nginx, driven by the registry's `@champion`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipelines.cli.common import user_errors
from pipelines.config.base import load_section
from pipelines.config.deploy import DeployConfig
from pipelines.config.serving import ServeConfig
from pipelines.errors import DetopsError

deploy_app = typer.Typer(help="Blue/green deployment behind nginx: up, rollout, status, rollback, watch, down.",
                         no_args_is_help=True)


def _deployer(serves: bool = True):  # noqa: ANN202 (the type lives in a module imported lazily)
    """The deployment; for a command that `serves` (starts or switches colours behind the front door),
    a one-line refusal first when authentication is off and the front door listens on a network address."""
    from deploy.rollout import Deployer

    cfg = load_section(DeployConfig)
    if serves:
        from serving.gateway.network import refuse_auth_off_exposed
        from serving.settings import load_gateway_config

        refuse_auth_off_exposed(load_gateway_config(), [cfg.host], "the front door (deploy.host)")
    return Deployer(cfg, load_section(ServeConfig))


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        typer.secho(f"repair: {note}", fg=typer.colors.YELLOW)


@deploy_app.command()
@user_errors
def up() -> None:
    """Serve @champion behind the front door (deploy.port); returns once the front door answers."""
    deployer = _deployer()
    stack = deployer.up()
    _print_notes(deployer.notes)
    typer.echo(f"live: v{stack.live_version} on {stack.live} since {stack.live_since}, front door {deployer.front_door}")


@deploy_app.command()
@user_errors
def rollout(version: Annotated[str, typer.Argument(help="registry version to roll out")],
            detach: Annotated[bool, typer.Option("--detach", help="return right after the switch; a running "
                                                 "`detops deploy watch` judges the new version")] = False) -> None:
    """Roll VERSION out: start the idle colour, verify it (smoke, shadow/canary), switch, then stay while the
    previous colour is warm and switch back by itself if the new version breaks; exit 4 when refused or
    rolled back."""
    deployer = _deployer()
    result = deployer.rollout(version)
    _print_notes(deployer.notes)
    typer.echo(f"v{result.version} is live on {result.colour} (rollout {result.id}, switch "
               f"{result.figures.get('switch_s')} s); v{result.from_version} stays warm for "
               f"{deployer.cfg.keep_previous_s:g} s; report {deployer.cfg.reports}/rollout-{result.id}.md")
    if not detach:
        typer.echo(f"watching v{result.version} while v{result.from_version} is warm (--detach to return at once)")
        typer.echo(deployer.watch_after_switch(result.id))


@deploy_app.command()
@user_errors
def rollback(reason: Annotated[str, typer.Option(help="why, recorded with the rollback")] = "manual rollback") -> None:
    """Back to the previous version (instant while it is warm); @champion follows. Done by the running
    `detops deploy watch` when there is one (it has the registry open), else by this command."""
    from deploy.state import Rollout
    from deploy.watch import ask_watcher

    deployer = _deployer()
    answer = ask_watcher(deployer.cfg, {"command": "rollback", "reason": reason})
    if answer is None:
        result, notes, by = deployer.rollback(reason=reason), deployer.notes, ""
    elif not answer["ok"]:
        raise DetopsError(answer["error"])
    else:
        result, notes, by = Rollout(**answer["rollout"]), answer["notes"], ", by the running watcher"
    _print_notes(notes)
    how = f"switch {result.figures['switch_s']} s{by}" if result.figures.get("warm") else f"full rollout{by}"
    typer.echo(f"v{result.version} is live again on {result.colour} ({how}); v{result.from_version} rolled back")


@deploy_app.command()
@user_errors
def status(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           last: Annotated[int, typer.Option(help="rollouts to list")] = 10) -> None:
    """The live colour and version since when, the previous one and whether it is warm, the last rollouts."""
    report = _deployer(serves=False).status(last)
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
    _deployer(serves=False).down()
    typer.echo("stopped: front door and colours")


@deploy_app.command()
@user_errors
def watch(once: Annotated[bool, typer.Option(help="check once and exit (cron)")] = False,
          webhook: Annotated[bool | None, typer.Option(help="receive MLflow webhooks (default: when the tracking "
                                                            "store is an MLflow server)")] = None,
          kubernetes: Annotated[bool, typer.Option("--kubernetes", help="patch the version annotation of the "
                                                   "Argo Rollout and worker Deployment (deploy.kubernetes) "
                                                   "instead of rolling out behind nginx")] = False) -> None:
    """Follow serve.model_name@champion: roll out what becomes champion, roll back when it moves back."""
    if kubernetes:
        from deploy.kubernetes import from_config

        cfg = load_section(DeployConfig)
        if webhook:
            raise DetopsError("deploy watch --kubernetes polls the registry (deploy.watch.poll_interval_s); "
                              "--webhook is for the nginx mode")
        from_config(cfg.kubernetes, load_section(ServeConfig).model_name, say=typer.echo).run(
            cfg.watch.poll_interval_s, once=once)
        return
    from deploy.watch import Watcher

    Watcher(_deployer(), say=typer.echo).run(once=once, webhook=webhook)


@deploy_app.command()
@user_errors
def smoke(url: Annotated[str, typer.Option(help="base URL of the service to check, e.g. http://detops-api-preview")],
          version: Annotated[str, typer.Option(help="registry version it must serve")]) -> None:
    """The deploy-time smoke check on its own (Kubernetes: the pre-promotion analysis Job): URL must
    answer as VERSION, and its evaluation sample must come back with the detections evaluation recorded."""
    import tempfile
    from pathlib import Path

    import httpx

    from deploy.verify import smoke as run_smoke
    from pipelines import registry

    cfg, serve = load_section(DeployConfig), load_section(ServeConfig)
    url = url.rstrip("/")
    try:
        served = httpx.get(f"{url}/livez", timeout=30).headers.get("X-Model-Version")
    except httpx.HTTPError as exc:
        raise DetopsError(f"smoke: {url} does not answer ({exc})") from None
    if served != str(version):
        raise DetopsError(f"smoke: {url} serves version {served!r}, expected {version!r}")
    with tempfile.TemporaryDirectory(prefix="detops-smoke-") as tmp:
        reference = registry.download_smoke_reference(serve.model_name, str(version), Path(tmp))
        figures = run_smoke(url, reference, iou=cfg.smoke_iou, conf_tolerance=cfg.smoke_conf_tolerance)
    if figures["mismatches"]:
        from deploy.verify import VerificationFailed

        raise VerificationFailed(f"smoke: {len(figures['mismatches'])} of {figures['images']} images differ from "
                                 f"v{version}'s evaluation; first: {figures['mismatches'][0]}")
    typer.echo(f"smoke passed: {url} serves v{version}; {figures['images']} images, {figures['detections']} "
               "detections as evaluated")
