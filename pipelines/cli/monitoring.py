"""Monitoring verbs: simulate, drift, push, purge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.common import app, user_errors
from pipelines.config.base import load_section
from pipelines.config.data import IngestConfig, SynthesizeConfig
from pipelines.config.monitoring import DriftConfig, PushConfig
from pipelines.config.serving import ServeConfig
from pipelines.errors import DetopsError


@app.command(rich_help_panel="Monitoring")
@user_errors
def simulate(
    url: Annotated[str, typer.Option(help="base URL of the detection service, e.g. http://127.0.0.1:3000")],
    n: Annotated[int, typer.Option("--n", help="number of images to send")] = 100,
    shift: Annotated[Optional[str], typer.Option(help="drift: dark, blur, background, scale, unseen_class")] = None,
    rate: Annotated[float, typer.Option(help="requests per second, at most")] = 5.0,
    seed: Annotated[int, typer.Option(help="generator seed (differs from training: fresh images)")] = 1000,
    timeout: Annotated[float, typer.Option(help="stop after this many seconds")] = 300.0,
) -> None:
    """POST synthetic images (in-distribution or shifted) to URL/detect; print the status codes."""
    from monitoring.simulate import simulate as run

    synth = load_section(SynthesizeConfig, shift=shift)  # validates the shift name like the file would
    result = run(url, n, shift=synth.shift, rate=rate, seed=seed, timeout_s=timeout, synth=synth)
    codes = ", ".join(f"{code}: {count}" for code, count in sorted(result.status_codes.items()))
    typer.echo(f"sent {result.sent} images in {result.seconds:.1f} s ({codes})")
    if result.sent < n:
        raise DetopsError(f"simulate: stopped after {timeout:g} s with {result.sent}/{n} images sent")
    if not any(code.startswith("2") for code in result.status_codes):
        raise DetopsError(f"simulate: no request to {url} succeeded ({codes})")


@app.command(rich_help_panel="Monitoring")
@user_errors
def drift(
    store: Annotated[Optional[Path], typer.Option(help="prediction store folder")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="reference parquet (default: the serving model's)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="report folder")] = None,
    last_n: Annotated[Optional[int], typer.Option("--last-n", help="window: the last N logged images")] = None,
    since: Annotated[Optional[str], typer.Option(help="window: logged since this ISO time")] = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version",
                                                         help="window: only this model version's records")] = None,
) -> None:
    """Evidently drift report of a window of the prediction log vs the reference; exit 3 on drift."""
    from monitoring.drift import run_drift

    serve = load_section(ServeConfig)
    cfg = load_section(DriftConfig, store=store, reference=reference, out=out, window_last_n=last_n,
                       window_since=since, model_version=model_version)
    result = run_drift(cfg, model_name=serve.model_name, alias=serve.alias)
    typer.echo(f"no drift: {result.n_drifted}/{result.n_columns} columns drifted "
               f"(share {result.drifted_share:.2f} < {cfg.drift_share}), window {result.window} "
               f"({result.n_current} images); report {cfg.out / 'drift.html'}")


@app.command(rich_help_panel="Monitoring")
@user_errors
def push(
    store: Annotated[Optional[Path], typer.Option(help="prediction store folder")] = None,
    images: Annotated[Optional[Path], typer.Option(help="folder of <sha256>.png|.jpg when images are not kept")] = None,
    labeling_config: Annotated[Optional[Path], typer.Option("--labeling-config", help="labeling config XML")] = None,
    last_n: Annotated[Optional[int], typer.Option("--last-n", help="window: the last N logged images")] = None,
    drifted: Annotated[bool, typer.Option("--drifted", help="the window drifted: push any image of it")] = False,
    batch: Annotated[Optional[str], typer.Option(help="feedback batch id (default: a timestamp)")] = None,
) -> None:
    """Create Label Studio tasks (with pre-annotations) for images worth labeling from the log."""
    from monitoring.feedback import push as run
    from monitoring.store import open_store

    cfg = load_section(PushConfig)
    drift_cfg = load_section(DriftConfig, store=store, window_last_n=last_n)
    xml_path = labeling_config or load_section(IngestConfig).labeling_config_file
    if xml_path is None or not Path(xml_path).is_file():
        where = xml_path or "beside ingest.export"
        raise DetopsError(f"push: no labeling config {where} (set ingest.labeling_config or pass --labeling-config)")
    window = open_store(drift_cfg.store).read(last_n=drift_cfg.window_last_n)
    result = run(window, cfg, labeling_config=Path(xml_path).read_text(), drifted=drifted, images=images,
                 batch_id=batch)
    where = f"project {result.project_id}" if result.project_id is not None else str(result.out)
    typer.echo(f"batch {result.batch_id}: {result.created} tasks -> {where} "
               f"({result.selected} selected, {result.skipped_existing} already there)")


@app.command(rich_help_panel="Monitoring")
@user_errors
def purge(
    store: Annotated[Optional[Path], typer.Option(help="prediction store (default serve.prediction_log)")] = None,
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="retention age: 30d, 12h, 90m")] = None,
    image: Annotated[Optional[str], typer.Option(help="sha256 of one image: delete its records and file")] = None,
    tenant: Annotated[Optional[str], typer.Option(help="delete everything this tenant left behind: jobs, their "
                                                  "images and results, prediction records, kept images "
                                                  "(with --older-than: only what is older)")] = None,
    expired: Annotated[bool, typer.Option("--expired", help="apply every tenant's retention "
                                          "(gateway.retention_days, gateway.tenants)")] = False,
) -> None:
    """Delete prediction records by age (retention) or everything about one image hash; with --tenant
    or --expired, tenants' jobs too (the job store of DETOPS_DATABASE_URL)."""
    from monitoring.store import open_store, parse_age

    location = store or load_section(ServeConfig).prediction_log
    if tenant is not None or expired:
        from serving.gateway.purge import purge_expired, purge_tenant
        from serving.settings import load_gateway_config

        if (tenant is not None) == expired or image is not None:
            raise DetopsError("purge: give --tenant T (optionally with --older-than AGE) or --expired alone")
        age = parse_age(older_than) if older_than is not None else None
        done = [purge_tenant(tenant, str(location), older_than=age)] if tenant is not None else \
            purge_expired(load_gateway_config(), str(location))
        for p in done:
            typer.echo(f"tenant {p.tenant}: purged {p.jobs} jobs and {p.predictions} prediction records")
        return
    if (older_than is None) == (image is None):
        raise DetopsError("purge: give exactly one of --older-than AGE, --image SHA256, --tenant T or --expired")
    target = open_store(location)
    if older_than is not None:
        n = target.purge_older_than(parse_age(older_than))
        typer.echo(f"purged {n} records older than {older_than}")
    else:
        n = target.delete_image(image.strip().lower())
        typer.echo(f"deleted {n} records of image {image}")
