"""`detops push`: send images worth labeling from the prediction log to Label Studio, with the
model's detections as pre-annotations.

Selection (from the current window): every image when the window drifted, otherwise images with a
low or near-threshold confidence (`min_confidence < push.low_conf`), no detection, or many
detections (`>= push.many_detections`); most uncertain first; one task per image hash; at most
`push.max_per_run` per run and `push.max_per_day` per UTC day (counted in `push.state`).

Images reach the server through Label Studio's local-files serving: the server runs with
LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<push.document_root>,
tasks point at `/data/local-files/?d=<path under the root>`, and the project gets a local-files
storage on the images folder (Label Studio only serves files under a project's storage). So push
needs the images: `serve.keep_images: true` (kept under the store) or `--images DIR` with
`<sha256>.png|.jpg` files. Idempotent: tasks carry `sha256` and existing ones are skipped. Without
LABEL_STUDIO_URL, the tasks go to a Label Studio import file (`push.out`) instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config.monitoring import PushConfig
from pipelines.errors import DetopsError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class PushResult:
    """What a push did: tasks created (or written), skipped as already pushed, the project id."""

    created: int
    skipped_existing: int
    selected: int
    project_id: int | None
    out: Path | None
    batch_id: str


def select(window: pd.DataFrame, cfg: PushConfig, *, drifted: bool = False) -> pd.DataFrame:
    """Rows worth labeling, deduplicated by image hash, most uncertain first, with a `reason` column."""
    import numpy as np

    if window.empty:
        return window.assign(reason=[])
    df = window.drop_duplicates("image_sha256", keep="last").copy()
    n = df["n_detections"].fillna(0)
    low = df["min_confidence"].fillna(1.0) < cfg.low_conf
    reason = np.select([n == 0, low, n >= cfg.many_detections], ["no detection", "low confidence",
                                                                 "many detections"], default="")
    df["reason"] = np.where((reason == "") & drifted, "drifted window", reason)
    df = df[df["reason"] != ""]
    # Uncertainty: no detection or the lowest best confidence first.
    df["_order"] = df["max_confidence"].fillna(0.0)
    return df.sort_values(["_order", "ts"]).drop(columns="_order")


def image_file(row: Any, images: Path | None) -> Path:
    """The image of a record: its kept copy, else `<images>/<sha256>.png|.jpg`."""
    if isinstance(row.image_path, str) and Path(row.image_path).is_file():
        return Path(row.image_path)
    if images is not None:
        for suffix in (".png", ".jpg", ".jpeg"):
            candidate = Path(images) / f"{row.image_sha256}{suffix}"
            if candidate.is_file():
                return candidate
    raise DetopsError(f"image {row.image_sha256}: no file to push (serve with serve.keep_images: true, "
                      "or pass --images DIR holding <sha256>.png|.jpg)")


def prediction(row: Any, class_names: list[str], from_name: str, to_name: str) -> dict:
    """The model's detections of one record as a Label Studio prediction (rectangles in percent)."""
    w, h = float(row.width), float(row.height)
    result = []
    for x1, y1, x2, y2, cls, conf in json.loads(row.detections):
        if not 0 <= int(cls) < len(class_names):
            raise DetopsError(f"image {row.image_sha256}: the model predicted class id {int(cls)} but the "
                              f"labeling config has {len(class_names)} labels ({', '.join(class_names)})")
        result.append({"from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
                       "original_width": int(w), "original_height": int(h), "score": conf,
                       "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                                 "height": 100 * (y2 - y1) / h, "rotation": 0,
                                 "rectanglelabels": [class_names[int(cls)]]}})
    score = sum(r["score"] for r in result) / len(result) if result else 0.0
    return {"model_version": f"{row.model_name}:{row.model_version}", "score": score, "result": result}


def _tag_names(xml: str) -> tuple[str, str]:
    from label_studio_sdk.label_interface import LabelInterface

    from labeling.studio import parse_labeling_config

    parsed = parse_labeling_config(xml)
    control = next(c for c in LabelInterface(xml).controls if c.name == parsed.rectangle_tags[0])
    return control.name, control.to_name[0]


def _state(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())["pushed"] if path.exists() else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DetopsError(f"{path}: push state is not valid JSON with a 'pushed' mapping") from None


def push(window: pd.DataFrame, cfg: PushConfig, *, labeling_config: str, drifted: bool = False,
         images: Path | None = None, batch_id: str | None = None) -> PushResult:
    """Select from `window` and create Label Studio tasks (or write `cfg.out` when no server is set)."""
    from labeling.studio import parse_labeling_config, studio_errors

    config = parse_labeling_config(labeling_config, "push labeling config")
    from_name, to_name = _tag_names(labeling_config)
    batch_id = batch_id or datetime.now(timezone.utc).strftime("fb-%Y%m%dT%H%M%S")
    state = _state(cfg.state)
    today = datetime.now(timezone.utc).date().isoformat()
    budget = min(cfg.max_per_run, cfg.max_per_day - sum(ts.startswith(today) for ts in state.values()))
    chosen = select(window, cfg, drifted=drifted)
    chosen = chosen[~chosen["image_sha256"].isin(state)]
    root = Path(cfg.document_root).resolve()

    server = os.environ.get("LABEL_STUDIO_URL")
    client, project_id, existing = None, None, set()
    if server:
        with studio_errors(server, f"project {cfg.project_title!r}"):
            client, project_id = _project(cfg.project_title, labeling_config)
            existing = _existing_hashes(client, project_id)
    tasks, skipped = [], 0
    for row in chosen.itertuples():
        if len(tasks) >= max(budget, 0):
            break
        if row.image_sha256 in existing:
            skipped += 1
            continue
        path = image_file(row, images).resolve()
        if not path.is_relative_to(root):
            raise DetopsError(f"{path}: not under push.document_root {root} (Label Studio serves only that folder)")
        tasks.append({"data": {config.image_key: f"/data/local-files/?d={path.relative_to(root)}",
                               "sha256": row.image_sha256, "reason": row.reason, "feedback_batch": batch_id},
                      "predictions": [prediction(row, config.class_names, from_name, to_name)]})
    if client is not None and tasks:
        folders = {str((root / t["data"][config.image_key].split("?d=", 1)[1]).parent) for t in tasks}
        with studio_errors(server, f"project {project_id}: import {len(tasks)} tasks"):
            _ensure_storage(client, project_id, folders)
            client.projects.import_tasks(id=project_id, request=tasks, return_task_ids=True)
    out = None
    if client is None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(tasks, indent=1))
    now = datetime.now(timezone.utc).isoformat()
    state.update({t["data"]["sha256"]: now for t in tasks})
    cfg.state.parent.mkdir(parents=True, exist_ok=True)
    cfg.state.write_text(json.dumps({"pushed": state}, indent=1))
    return PushResult(len(tasks), skipped, len(chosen), project_id, out, batch_id)


def _project(title: str, labeling_config: str) -> tuple[Any, int]:
    from label_studio_sdk import LabelStudio

    from labeling.studio import studio_env

    url, key = studio_env()
    client = LabelStudio(base_url=url, api_key=key)
    for project in client.projects.list(title=title):
        if project.title == title:
            return client, project.id
    return client, client.projects.create(title=title, label_config=labeling_config).id


def _existing_hashes(client: Any, project_id: int) -> set[str]:
    return {t.data.get("sha256") for t in client.tasks.list(project=project_id, fields="all") if t.data}


def _ensure_storage(client: Any, project_id: int, folders: set[str]) -> None:
    have = {s.path for s in client.import_storage.local.list(project=project_id)}
    for folder in sorted(folders - have):
        client.import_storage.local.create(project=project_id, path=folder, title=f"detops {Path(folder).name}",
                                           use_blob_urls=False)
