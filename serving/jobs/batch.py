"""`detops batch`: a folder of images through the model, in-process (`run`) or as a job of a running
service (`submit`).

Both write the same JSON Lines (one record per file: its path relative to the folder, its status,
then the `/detect` body or `error` and `detail`) and COCO results beside it (image ids: the files'
positions in sorted path order).

`run` is resumable: records already in the output file are skipped (a torn last line from an
interrupted run is dropped first), and each chunk's records are flushed as soon as they are ready.
It runs `processes` model processes with one ONNX Runtime thread each (the fastest layout on CPUs,
docs/performance.md), reading, decoding and detecting chunks of files in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import DetopsError
from serving.jobs.results import IMAGE_FAILED, IMAGE_SUCCEEDED, coco_results, result_line
from serving.runtime import CARD_FILE, ModelCard

SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo")


def image_files(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively) with an image suffix, in sorted path order."""
    if not folder.is_dir():
        raise DetopsError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DetopsError(f"{folder}: no images ({', '.join(SUFFIXES)})")
    return files


def read_done(out: Path) -> dict[str, dict[str, Any]]:
    """The records already in `out`, by path; a torn last line (an interrupted write) is cut off."""
    if not out.is_file():
        return {}
    done: dict[str, dict[str, Any]] = {}
    good_bytes = 0
    with out.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n") or not isinstance(record, dict) or "path" not in record:
                break
            done[record["path"]] = record
            good_bytes += len(raw)
    if good_bytes != out.stat().st_size:
        with out.open("r+b") as f:
            f.truncate(good_bytes)
    return done


def folder_status(out: Path, files: Sequence[Path], folder: Path) -> tuple[str, int]:
    """The status of the folder's records in `out` by a job's rule (`serving.jobs.store.job_status`:
    succeeded, partial or failed) and how many of its files succeeded."""
    from serving.jobs.store import Counts, job_status

    done = read_done(out)
    succeeded = sum(done.get(f.relative_to(folder).as_posix(), {}).get("status") == IMAGE_SUCCEEDED for f in files)
    total = len(files)
    return job_status(Counts(total=total, succeeded=succeeded, failed=total - succeeded, dead=0)), succeeded


def coco_path(out: Path) -> Path:
    """Where the COCO results go beside a JSON Lines file: results.jsonl -> results.coco.json."""
    return out.with_name(out.stem + ".coco.json")


def write_coco(out: Path, folder_files: Sequence[Path], folder: Path) -> Path:
    """COCO results of the records of `out` for the files of the folder (image_id = sorted position)."""
    ids = {f.relative_to(folder).as_posix(): i for i, f in enumerate(folder_files)}
    records = read_done(out)
    path = coco_path(out)
    path.write_text(json.dumps(coco_results((ids[p], r) for p, r in records.items() if p in ids)))
    return path


# --------------------------------------------------------------------------- run (in-process)
@dataclass(frozen=True)
class ModelSource:
    """Where `batch run` takes its model: a local folder, or a registry version."""

    model_dir: Path
    name: str
    version: str


_runtime: Any = None
_model_info: Any = None
_load_error: DetopsError | None = None  # a pool process whose model did not load says why on its first chunk


def _init_process(model_dir: str, name: str, version: str, threads: int) -> None:
    """Load the model into this process (the pool's initializer, or this process with one process)."""
    global _runtime, _model_info, _load_error
    from pipelines import environment
    from serving.runtime import ModelRuntime
    from serving.schemas import ModelInfo

    environment.configure()
    try:
        _runtime = ModelRuntime.load(Path(model_dir), threads=threads)
    except DetopsError as exc:
        _load_error = exc
        return
    _model_info = ModelInfo(name=name, version=version, alias=None)


def _detect_files(root: str, rels: list[str], options: dict[str, Any], max_bytes: int,
                  max_pixels: int) -> list[dict[str, Any]]:
    from serving.jobs.engine import detect_encoded

    if _load_error is not None:
        raise _load_error

    records: dict[int, dict[str, Any]] = {}
    payloads, indices = [], []
    for i, rel in enumerate(rels):
        try:
            payloads.append((Path(root) / rel).read_bytes())
            indices.append(i)
        except OSError as exc:
            records[i] = result_line({"path": rel}, IMAGE_FAILED, None, "unreadable_file",
                                     f"cannot read the file ({exc})")
    for r in detect_encoded(_runtime, payloads, indices, _runtime.resolve(**options), _model_info, max_bytes=max_bytes,
                            max_pixels=max_pixels):
        records[r.index] = result_line({"path": rels[r.index]}, r.status, r.body, r.error, r.detail)
    return [records[i] for i in range(len(rels))]


def run_folder(folder: Path, files: Sequence[Path], out: Path, source: ModelSource, options: dict[str, Any], *,
               processes: int, chunk_size: int, max_bytes: int, max_pixels: int,
               progress: Callable[[int, int], None] | None = None) -> tuple[int, int, int]:
    """Detect every file of `files` (`image_files(folder)`) not yet in `out`; (images done now,
    already done before, failed now). Calls `progress(advance, total)` as chunks complete (the
    files already done count with the first)."""
    done = read_done(out)
    rels = [f.relative_to(folder).as_posix() for f in files]
    todo = [r for r in rels if r not in done]
    if processes <= 1:  # this process runs the model
        _init_process(str(source.model_dir), source.name, source.version, 1)
        if _load_error is not None:
            raise _load_error
    ModelCard.load(source.model_dir / CARD_FILE).resolve(**options)  # bad options fail before any work
    already = len(rels) - len(todo)  # shown with the first chunk: a model that cannot start leaves no bar
    chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)]
    failed = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        for lines in _map_chunks(chunks, str(folder), options, processes, source, max_bytes, max_pixels):
            sink.write("".join(json.dumps(line) + "\n" for line in lines))
            sink.flush()
            failed += sum(line["status"] != "succeeded" for line in lines)
            if progress:
                progress(len(lines) + already, len(rels))
                already = 0
        os.fsync(sink.fileno())
    if progress and already:
        progress(already, len(rels))
    write_coco(out, files, folder)
    return len(todo), len(rels) - len(todo), failed


def _map_chunks(chunks: list[list[str]], root: str, options: dict[str, Any], processes: int, source: ModelSource,
                max_bytes: int, max_pixels: int) -> Iterator[list[dict[str, Any]]]:
    """The chunks' records as they complete: in this process when `processes` is 1, else in a pool
    with at most two chunks per process in flight (memory stays bounded)."""
    if processes <= 1:
        for chunk in chunks:
            yield _detect_files(root, chunk, options, max_bytes, max_pixels)
        return
    try:
        with ProcessPoolExecutor(processes, initializer=_init_process,
                                 initargs=(str(source.model_dir), source.name, source.version, 1)) as pool:
            pending: set[Future] = set()
            queued = iter(chunks)
            while True:
                for chunk in queued:
                    pending.add(pool.submit(_detect_files, root, chunk, options, max_bytes, max_pixels))
                    if len(pending) >= 2 * processes:
                        break
                if not pending:
                    return
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
    except BrokenProcessPool:
        raise DetopsError(f"{source.model_dir}: a model process died (out of memory?); try fewer --processes") from None


# --------------------------------------------------------------------------- submit (through POST /jobs)
def submission_key(folder: Path, files: Sequence[Path], options: dict[str, Any]) -> str:
    """An Idempotency-Key from the folder's files and the options: submitting the same folder again
    (after a crash, a lost connection) finds the same job instead of starting another."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for f in files:
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return "batch-" + digest.hexdigest()


def submit_folder(folder: Path, url: str, options: dict[str, Any], *, out: Path | None, poll_s: float,
                  timeout_s: float, on_record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Submit the folder as one job, then poll it, calling `on_record` for each image's record as it
    arrives (in path order when they arrive together); returns the final job summary."""
    import httpx

    from serving.jobs.store import ENDED

    files = image_files(folder)
    rels = [f.relative_to(folder).as_posix() for f in files]
    form = {k: json.dumps(v) if k == "classes" else str(v) for k, v in options.items() if v is not None}
    headers = {"Idempotency-Key": submission_key(folder, files, options)}
    base = url.rstrip("/")
    from serving.client import auth_headers

    with httpx.Client(base_url=base, timeout=120, headers=auth_headers()) as client:  # DETOPS_API_KEY
        uploads = [("images", (rel, f.read_bytes())) for rel, f in zip(rels, files)]
        response = _request(client, "POST", "/jobs", files=uploads, data=form, headers=headers)
        job_id = response.json()["job_id"]
        next_index = 0
        seen: set[int] = set()
        sink = out.open("w") if out is not None else None
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                summary = _request(client, "GET", f"/jobs/{job_id}").json()
                finished = summary["status"] in ENDED
                lines = _request(client, "GET", f"/jobs/{job_id}/results", params={"from_index": next_index}).text
                for raw in lines.splitlines():
                    record = json.loads(raw)
                    if record["index"] in seen:
                        continue
                    seen.add(record["index"])
                    line = {"path": rels[record["index"]],
                            **{k: v for k, v in record.items() if k not in ("index", "name")}}
                    on_record(line)
                    if sink is not None:
                        sink.write(json.dumps(line) + "\n")
                while next_index in seen:
                    next_index += 1
                if finished:
                    break
                if time.monotonic() > deadline:
                    raise DetopsError(f"job {job_id} not finished after {timeout_s:.0f} s "
                                      f"(status {summary['status']}); "
                                      f"see {base}/jobs/{job_id}")
                time.sleep(poll_s)
        finally:
            if sink is not None:
                sink.close()
    if out is not None:
        write_coco(out, files, folder)
    return summary


def _request(client: Any, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise DetopsError(f"{client.base_url}{path}: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        try:
            body = response.json()
            message = f"{body['error']}: {body['detail']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise DetopsError(f"{method} {path}: HTTP {response.status_code}: {message}")
    return response
