"""Label Studio on our side: the JSON export schema, the labeling config, image references, and `pull`.

The export schema is the subset of Label Studio's JSON export that ingest reads; every other key is
kept but ignored, so exports from newer servers still load. A problem in one task is reported as a
DetopsError naming the export file and the task id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import DetopsError

URL_ENV = "LABEL_STUDIO_URL"
KEY_ENV = "LABEL_STUDIO_API_KEY"


# --------------------------------------------------------------------------- export schema
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Region(_Lenient):
    """One item of an annotation's `result`: a region (rectangle, polygon, ...) or a classification."""

    type: str
    from_name: str = ""
    to_name: str = ""
    value: dict[str, Any] = {}
    original_width: int | None = Field(None, gt=0)
    original_height: int | None = Field(None, gt=0)


class Annotation(_Lenient):
    """One annotator's work on a task."""

    id: int | None = None
    result: list[Region] = []
    was_cancelled: bool = False
    ground_truth: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    completed_by: Any = None

    @property
    def touched_at(self) -> datetime | None:
        """When the annotation was last changed: updated_at, else created_at."""
        return self.updated_at or self.created_at


class Task(_Lenient):
    """One exported task: its data (the image reference) and its annotations."""

    id: int
    data: dict[str, Any]
    annotations: list[Annotation] = []

    @model_validator(mode="before")
    @classmethod
    def _legacy_completions(cls, raw: Any) -> Any:
        # Exports from Label Studio < 1.0 call annotations "completions".
        if isinstance(raw, dict) and "annotations" not in raw and "completions" in raw:
            raw = {**raw, "annotations": raw["completions"]}
        return raw


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "task"
    return f"{loc}: {err['msg']}"


def load_export(path: Path) -> list[Task]:
    """Read a Label Studio JSON export (a list of tasks, or one task) and validate every task."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetopsError(f"{path}: export file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DetopsError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:  # a folder, no permission, ...
        raise DetopsError(f"{path}: cannot read the export ({exc.strerror or exc})") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise DetopsError(f"{path}: expected a list of tasks, got {type(raw).__name__}")
    tasks = []
    for index, item in enumerate(raw):
        name = f"task {item.get('id')}" if isinstance(item, dict) and "id" in item else f"task #{index}"
        try:
            tasks.append(Task.model_validate(item))
        except ValidationError as exc:
            raise DetopsError(f"{path}: {name}: {_describe(exc)}") from None
    return tasks


# --------------------------------------------------------------------------- labeling config
@dataclass(frozen=True)
class LabelingConfig:
    """What ingest needs from a labeling config: class names in order and where the image is."""

    class_names: list[str]
    image_key: str  # the task data key holding the image reference, e.g. "image" for value="$image"
    rectangle_tags: list[str]  # from_name of each <RectangleLabels>


def parse_labeling_config(xml: str, source: str = "labeling config") -> LabelingConfig:
    """Parse a labeling config with the SDK's LabelInterface; classes keep the XML's <Label> order."""
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises bare Exception subclasses for XML syntax errors
        raise DetopsError(f"{source}: not a valid labeling config ({exc})") from None
    rects = [c for c in interface.controls if c.tag == "RectangleLabels"]
    if not rects:
        raise DetopsError(f"{source}: no <RectangleLabels> tag")
    names: list[str] = []
    for control in rects:
        names += [label for label in control.labels if label not in names]
    if not names:
        raise DetopsError(f"{source}: <RectangleLabels> has no <Label>")
    images = {o.name: o for o in interface.objects if o.tag == "Image"}
    target = next((images[n] for c in rects for n in c.to_name if n in images), None)
    if target is None:
        raise DetopsError(f"{source}: <RectangleLabels> does not point at an <Image> tag")
    return LabelingConfig(class_names=names, image_key=target.value.lstrip("$"),
                          rectangle_tags=[c.name for c in rects])


def load_labeling_config(path: Path) -> LabelingConfig:
    """Read and parse a labeling config XML file."""
    try:
        xml = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DetopsError(f"{path}: labeling config not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DetopsError(f"{path}: cannot read the labeling config ({exc})") from None
    return parse_labeling_config(xml, str(path))


# --------------------------------------------------------------------------- image references
def image_name(ref: str) -> str:
    """The file name an image reference points at (`?d=` path for local-files URLs)."""
    parsed = urlparse(ref)
    if parsed.path.startswith("/data/local-files"):
        values = parse_qs(parsed.query).get("d")
        return Path(values[0]).name if values else ""
    return Path(unquote(parsed.path)).name


def resolve_image(ref: str, root: Path, cache_dir: Path, timeout_s: float = 10.0) -> Path:
    """The local file of an image reference, as Label Studio writes them.

    - `/data/upload/<project>/<name>`: `<root>/upload/<project>/<name>` (Label Studio's media folder),
      then `<root>/images/<name>`, then `<root>/<name>`;
    - `/data/local-files/?d=<relative path>`: `<root>/<path>` (URL-decoded), then `<root>/images/<name>`;
    - `http(s)://...`: fetched once into `cache_dir` (named by the URL's hash);
    - anything else: a path, absolute or relative to `root`.
    Raises DetopsError naming the reference and the places tried.
    """
    parsed = urlparse(ref)
    if parsed.scheme in ("http", "https"):
        return _fetch(ref, cache_dir, timeout_s)
    candidates: list[Path]
    if parsed.path.startswith("/data/upload/"):
        rel = Path(unquote(parsed.path[len("/data/upload/"):]))
        candidates = [root / "upload" / rel, root / "images" / rel.name, root / rel.name]
    elif parsed.path.startswith("/data/local-files"):
        values = parse_qs(parsed.query).get("d")
        if not values:
            raise DetopsError(f"image reference {ref!r}: local-files URL without ?d=<path>")
        rel = Path(values[0])  # parse_qs already URL-decodes
        candidates = [root / rel, root / "images" / rel.name]
    else:
        path = Path(unquote(ref))
        candidates = [path if path.is_absolute() else root / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DetopsError(f"image {ref!r} not found (tried {tried})")


def _fetch(url: str, cache_dir: Path, timeout_s: float) -> Path:
    """Download an http(s) image once; later runs reuse the cached copy."""
    import httpx

    name = image_name(url) or "image"
    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}_{name}"
    if target.is_file():
        return target
    try:
        response = httpx.get(url, timeout=timeout_s, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise DetopsError(f"image {url!r}: download failed ({exc.__class__.__name__}: {exc})") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(response.content)
    partial.replace(target)  # a crash mid-write never leaves a truncated file under the final name
    return target


# --------------------------------------------------------------------------- pull from a live server
def studio_env() -> tuple[str, str]:
    """Label Studio's URL and API key from LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
    url = os.environ.get(URL_ENV, "").strip()
    key = os.environ.get(KEY_ENV, "").strip()
    missing = [name for name, value in ((URL_ENV, url), (KEY_ENV, key)) if not value]
    if missing:
        raise DetopsError(f"set {' and '.join(missing)} to reach Label Studio")
    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise DetopsError(f"{URL_ENV}={url!r}: expected an http(s) URL such as http://127.0.0.1:8080")
    return url.rstrip("/"), key


def media_url(base_url: str, ref: str) -> str | None:
    """The server URL of a task's image when the server serves it (`/data/...`), else None
    (http(s) references are fetched by ingest itself; other references are not on the server)."""
    if urlparse(ref).scheme or not ref.startswith("/data/"):
        return None
    return urljoin(base_url.rstrip("/") + "/", ref.lstrip("/"))


@contextmanager
def studio_errors(base_url: str, what: str) -> Iterator[None]:
    """Turn the Label Studio SDK's and httpx's errors (server down, bad key, HTTP 4xx/5xx) into one
    DetopsError naming the server and what was being done."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as exc:
        raise DetopsError(f"Label Studio at {base_url}, {what}: HTTP {exc.status_code}: {exc.body}") from None
    except httpx.HTTPError as exc:
        raise DetopsError(f"Label Studio at {base_url}, {what}: {exc.__class__.__name__}: {exc}") from None


def pull(project_id: int, out: Path) -> Path:
    """Export project `project_id` into `out`: export.json (all tasks, unchanged), labeling_config.xml,
    and images/<name> for every image the server serves under /data/. Returns the export path."""
    import httpx
    from label_studio_sdk import LabelStudio
    from rich.progress import track

    base_url, key = studio_env()
    client = LabelStudio(base_url=base_url, api_key=key)
    with studio_errors(base_url, f"project {project_id}"):
        project = client.projects.get(id=project_id)
        tasks = client.projects.exports.as_json(project_id)
    config = parse_labeling_config(project.label_config or "", f"project {project_id} labeling config")

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labeling_config.xml").write_text(project.label_config, encoding="utf-8")
    # The SDK's own auth headers: they know legacy tokens ("Token") from personal access tokens (JWT).
    headers = client._client_wrapper.get_headers()
    seen: dict[str, str] = {}
    with httpx.Client(headers=headers, timeout=60, follow_redirects=True) as http, \
            studio_errors(base_url, f"project {project_id} images"):
        for task in track(tasks, description=f"pull project {project_id}", transient=True):
            ref = str(task.get("data", {}).get(config.image_key, ""))
            url = media_url(base_url, ref)
            if url is None:
                continue
            name = image_name(ref)
            if seen.setdefault(name, ref) != ref:
                raise DetopsError(f"task {task.get('id')}: image name {name!r} also used by {seen[name]!r}")
            target = out / "images" / name
            if target.is_file():
                continue
            response = http.get(url)
            if response.status_code != 200:
                raise DetopsError(f"task {task.get('id')}: GET {url}: HTTP {response.status_code}")
            target.write_bytes(response.content)
    export = out / "export.json"
    export.write_text(json.dumps(tasks, indent=1), encoding="utf-8")
    return export
