"""Data verbs: synthesize, ingest, pull, validate, augment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.common import app, user_errors
from pipelines.config.base import load_section
from pipelines.config.data import AugmentConfig, IngestConfig, SynthesizeConfig, ValidateConfig


@app.command(rich_help_panel="Data")
@user_errors
def synthesize(
    out: Annotated[Optional[Path], typer.Option(help="output folder")] = None,
    n_images: Annotated[Optional[int], typer.Option("--n-images", help="number of images")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    shift: Annotated[Optional[str], typer.Option(help="drift: dark, blur, background, scale, unseen_class")] = None,
) -> None:
    """Generate a synthetic Label Studio project: export.json, images/, labeling_config.xml."""
    from labeling.synthetic import synthesize as run

    cfg = load_section(SynthesizeConfig, out=out, n_images=n_images, seed=seed, shift=shift)
    run(cfg)


@app.command(rich_help_panel="Data")
@user_errors
def ingest(
    export: Annotated[Optional[list[Path]], typer.Option(help="Label Studio JSON export (repeatable: merged)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output YOLO dataset folder")] = None,
    images_root: Annotated[Optional[Path], typer.Option("--images-root", help="where the images live locally")] = None,
    labeling_config: Annotated[Optional[Path], typer.Option("--labeling-config", help="labeling config XML")] = None,
) -> None:
    """Convert a Label Studio export into a split YOLO dataset and an ingest report."""
    from labeling.ingest import ingest as run

    exports = export[0] if export and len(export) == 1 else export or None
    cfg = load_section(IngestConfig, export=exports, out=out, images_root=images_root, labeling_config=labeling_config)
    report = run(cfg)
    typer.echo(f"ingest: {report.images_written} images {report.images_per_split} ({report.background_images} "
               f"background) -> {cfg.out}")


@app.command(rich_help_panel="Data")
@user_errors
def pull(
    project: Annotated[int, typer.Option(help="Label Studio project id")],
    out: Annotated[Path, typer.Option(help="folder for export.json, labeling_config.xml and images/")],
) -> None:
    """Export a project from a live Label Studio server (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)."""
    from labeling.studio import pull as run

    run(project_id=project, out=out)


@app.command(rich_help_panel="Data")
@user_errors
def validate(
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder")] = None,
    report: Annotated[Optional[Path], typer.Option(help="report folder")] = None,
) -> None:
    """Check the dataset with Great Expectations; exit 1 when an expectation fails."""
    from rich.console import Console

    from training.validate import validate as run

    cfg = load_section(ValidateConfig, dataset=dataset, report=report)
    summary = run(cfg)
    splits = ", ".join(f"{s} {n}" for s, n in summary.images_per_split.items())
    Console().print(f"[green]validation passed[/green]: {len(summary.outcomes)} expectations, "
                    f"{summary.n_images} images ({splits}), {summary.n_boxes} boxes; "
                    f"report {summary.report_dir / 'validation.html'}")


@app.command(rich_help_panel="Data")
@user_errors
def augment(
    dataset: Annotated[Optional[Path], typer.Option(help="YOLO dataset folder")] = None,
    out: Annotated[Optional[Path], typer.Option(help="augmented dataset folder")] = None,
) -> None:
    """Write an augmented copy of the dataset (train split only) and a preview grid."""
    from rich.console import Console

    from training.augment import augment as run

    cfg = load_section(AugmentConfig, dataset=dataset, out=out)
    s = run(cfg)
    Console().print(f"augment: {s.train_images} train images + {s.augmented_images} augmented "
                    f"({s.boxes_dropped} of {s.boxes_in} boxes dropped), val {s.val_images}, "
                    f"test {s.test_images} -> {s.out} in {s.seconds:.1f} s; preview {s.preview}")
