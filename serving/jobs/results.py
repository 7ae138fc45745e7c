"""What a processed image is, and the two result formats every job front end writes: a JSON Lines
record per image and COCO results. Shared by the job store, the workers, the HTTP routes and
`detops batch`, so that `GET /jobs/{id}/results` and `detops batch run` write the same lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

IMAGE_SUCCEEDED, IMAGE_FAILED, IMAGE_DEAD = "succeeded", "failed", "dead"


@dataclass(frozen=True)
class ImageResult:
    """One image's outcome: the `/detect` body (image, detections, model), or an error code and
    a detail naming the problem. `status`: succeeded, failed (a bad image) or dead (dead-lettered)."""

    index: int
    status: str
    body: dict[str, Any] | None = None
    error: str | None = None
    detail: str | None = None


def result_line(ident: dict[str, Any], status: str, body: dict[str, Any] | None, error: str | None,
                detail: str | None) -> dict[str, Any]:
    """One JSON Lines record: the image's identity (`index` and `name` in a job, `path` in a
    folder), its status, then the `/detect` body or `error` and `detail`."""
    if body is not None:
        return {**ident, "status": status, **body}
    return {**ident, "status": status, "error": error, "detail": detail}


def coco_results(lines: Iterable[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """COCO results (the list pycocotools' `loadRes` reads) of (image id, record) pairs: one entry
    per detection with bbox [x, y, w, h] in pixels and the calibrated confidence as score.
    Records without detections (errors) add nothing."""
    out = []
    for image_id, line in lines:
        for det in line.get("detections") or ():
            box = det["box"]
            out.append({"image_id": int(image_id), "category_id": int(det["class_id"]),
                        "bbox": [box["x1"], box["y1"], box["x2"] - box["x1"], box["y2"] - box["y1"]],
                        "score": det["confidence"]})
    return out
