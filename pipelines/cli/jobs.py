"""Job verbs: `detops worker` (a Celery worker pool of the jobs) and `detops batch run|submit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.common import app, user_errors

batch = typer.Typer(help="A folder of images through the model: in-process (run) or as a job of a service (submit).",
                    no_args_is_help=True)

Folder = Annotated[Path, typer.Argument(help="folder of images (searched recursively)")]
Conf = Annotated[Optional[float], typer.Option(help="minimum calibrated confidence (default: model card)")]
Iou = Annotated[Optional[float], typer.Option(help="NMS IoU threshold (default: model card)")]
MaxDet = Annotated[Optional[int], typer.Option("--max-det", help="most detections per image (default: model card)")]
Classes = Annotated[Optional[str], typer.Option(help="keep only these class ids, e.g. 0,2 (default: all)")]


@app.command(rich_help_panel="Serving")
@user_errors
def worker(
    concurrency: Annotated[Optional[int], typer.Option(help="pool processes (default jobs.worker_concurrency, "
                                                       "else the machine's cores)")] = None,
    queues: Annotated[Optional[str], typer.Option(help="comma-separated queues to consume "
                                                  "(default jobs.queue)")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run a pool of job workers (Celery) until stopped; start one per machine for more capacity.
    Broker, job store and object store: DETOPS_BROKER_URL, DETOPS_DATABASE_URL, DETOPS_OBJECT_STORE_URL
    (unset: the embedded files under jobs.data_dir). Model: DETOPS_WORKER_MODEL_VERSION, else the
    version `detops deploy` serves, else serve.model_name@serve.alias from the registry.
    SIGTERM stops it within jobs.shutdown_grace_s (default 30 s; DETOPS_JOBS_SHUTDOWN_GRACE_S): it takes
    no new work and lets running chunks finish, then kills its pool processes and exits 1 when the
    grace runs out (a chunk cut short is retried once its lease expires). Its heartbeat, every
    jobs.reap_interval_s, is what /readyz and /metrics count as a live worker."""
    from pipelines.errors import DetopsError

    if concurrency is not None and concurrency < 1:
        raise DetopsError(f"--concurrency must be >= 1 (got {concurrency})")
    from serving.jobs.models import live_model

    live_model()  # a missing model is a one-line error now, not a retry loop in every process later
    from serving.jobs.worker import run_worker

    run_worker(concurrency=concurrency, queues=queues.split(",") if queues else None, loglevel=loglevel)


def _options(conf: float | None, iou: float | None, max_det: int | None, classes: str | None) -> dict[str, Any]:
    from pipelines.errors import DetopsError

    parsed = None
    if classes is not None:
        try:
            parsed = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise DetopsError(f"--classes: expected class ids like 0,2 (got {classes!r})") from None
    return {"conf": conf, "iou": iou, "max_det": max_det, "classes": parsed}


@batch.command("run")
@user_errors
def batch_run(
    folder: Folder,
    out: Annotated[Path, typer.Option("--out", help="JSON Lines output (COCO results beside it: <stem>.coco.json)")],
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="a local model folder instead of the "
                                                      "registry's live version")] = None,
    version: Annotated[Optional[str], typer.Option(help="registry version (default: the one workers load)")] = None,
    processes: Annotated[Optional[int], typer.Option(help="model processes (default: the machine's cores)")] = None,
    conf: Conf = None, iou: Iou = None, max_det: MaxDet = None, classes: Classes = None,
) -> None:
    """Detect every image of FOLDER in this process's model runtime, writing one record per file
    to --out; re-running skips the files already there. Ends with the folder's status as a job's
    (succeeded, partial: some images failed; exit 1 when none succeeded)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from pipelines.errors import DetopsError
    from serving.jobs.batch import ModelSource, coco_path, folder_status, image_files, run_folder
    from serving.jobs.models import live_model, model_folder
    from serving.runtime import available_cores
    from serving.settings import load_jobs_config, load_serve_config

    if model_dir is not None and version is not None:
        raise DetopsError("batch run: give at most one of --model-dir and --version")
    if processes is not None and processes < 1:
        raise DetopsError(f"--processes must be >= 1 (got {processes})")
    serve, jobs = load_serve_config(), load_jobs_config()
    files = image_files(folder)
    if model_dir is not None:
        source = ModelSource(model_dir=model_dir, name=serve.model_name, version=f"local:{model_dir.resolve()}")
    else:
        from pipelines import registry

        found = str(registry.resolve(serve.model_name, version=version).version) if version else live_model().version
        source = ModelSource(model_dir=model_folder(serve.model_name, found), name=serve.model_name, version=found)
    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
    task = bar.add_task(f"{folder}", total=len(files))

    def advance(n: int, total: int) -> None:
        bar.start()  # once the model and options were accepted: an error stays one line
        bar.update(task, advance=n, total=total)

    try:
        new, before, failed = run_folder(folder, files, out, source, _options(conf, iou, max_det, classes),
                                         processes=processes or available_cores(), chunk_size=jobs.chunk_size,
                                         max_bytes=jobs.max_image_bytes, max_pixels=serve.max_pixels, progress=advance)
    finally:
        if bar.live.is_started:
            bar.stop()
    typer.echo(f"{new} images detected ({failed} failed), {before} already in {out}; COCO results: {coco_path(out)}")
    status, succeeded = folder_status(out, files, folder)
    if status == "failed":
        raise DetopsError(f"failed: none of the {len(files)} images of {folder} could be processed (see {out})")
    typer.echo(f"{status}: {succeeded} of {len(files)} images succeeded")


@batch.command("submit")
@user_errors
def batch_submit(
    folder: Folder,
    url: Annotated[str, typer.Option("--url", help="the service, e.g. http://127.0.0.1:3000")],
    out: Annotated[Optional[Path], typer.Option("--out", help="also write the records as JSON Lines (and COCO "
                                                "results beside it)")] = None,
    poll: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
    timeout: Annotated[float, typer.Option(help="give up waiting after this many seconds")] = 3600.0,
    conf: Conf = None, iou: Iou = None, max_det: MaxDet = None, classes: Classes = None,
) -> None:
    """Submit FOLDER as one job (POST /jobs) and print each image's result as it arrives, then the
    job's status (succeeded, partial: some images failed; exit 1 when failed or cancelled).
    Submitting the same folder again finds the same job (its Idempotency-Key is the folder's content)."""
    from pipelines.errors import DetopsError
    from serving.jobs.batch import submit_folder

    if not url.startswith(("http://", "https://")):
        raise DetopsError(f"--url: expected http(s)://host:port (got {url!r})")

    def show(record: dict[str, Any]) -> None:
        if record["status"] == "succeeded":
            names = [d["class_name"] for d in record["detections"]]
            counts = ", ".join(f"{names.count(n)} {n}" for n in sorted(set(names))) or "nothing"
            typer.echo(f"{record['path']}: {counts}")
        else:
            typer.echo(f"{record['path']}: {record['error']}: {record['detail']}")

    summary = submit_folder(folder, url, _options(conf, iou, max_det, classes), out=out, poll_s=poll,
                            timeout_s=timeout, on_record=show)
    counts = summary["counts"]
    typer.echo(f"job {summary['job_id']} {summary['status']}: {counts['succeeded']} succeeded, {counts['failed']} "
               f"failed of {counts['total']} (model v{summary['model']['version']})")
    if summary["status"] not in ("succeeded", "partial"):  # partial: finished, its failed images printed above
        raise DetopsError(f"job {summary['job_id']} {summary['status']}: {summary.get('error') or json.dumps(counts)}")
