"""Response bodies of the service (their JSON schema is what /docs.json shows) and the error body."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from pipelines.types import Detection


class ImageInfo(BaseModel):
    width: int = Field(description="width of the EXIF-oriented image, pixels", examples=[640])
    height: int = Field(description="height of the EXIF-oriented image, pixels", examples=[480])
    sha256: str = Field(description="SHA-256 of the uploaded bytes", examples=["9f86d081884c7d65..."])


class BoxModel(BaseModel):
    x1: float = Field(description="left, pixels of the oriented image", examples=[12.5])
    y1: float = Field(description="top", examples=[40.0])
    x2: float = Field(description="right", examples=[118.0])
    y2: float = Field(description="bottom", examples=[151.25])


class DetectionModel(BaseModel):
    box: BoxModel
    class_id: int = Field(examples=[1])
    class_name: str = Field(examples=["circle"])
    confidence: float = Field(description="calibrated probability that the detection is right", examples=[0.91])
    raw_confidence: float = Field(description="the network's own score", examples=[0.84])


class ModelInfo(BaseModel):
    name: str = Field(examples=["detops-detector"])
    version: str = Field(description="registry version, or `local:<bento model version>`", examples=["3"])
    alias: str | None = Field(description="registry alias it was imported under", examples=["champion"])


class DetectResponse(BaseModel):
    image: ImageInfo
    detections: list[DetectionModel]
    model: ModelInfo


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable reason", examples=["file_too_large"])
    detail: str = Field(description="what is wrong, naming the field or limit",
                        examples=["image: 30000000 bytes is over the limit of 20971520 bytes"])


def detect_response(width: int, height: int, sha256: str, detections: Sequence[Detection],
                    class_names: Sequence[str], model: ModelInfo) -> dict:
    """The /detect body of one image: what `DetectResponse` dumps, built as plain dicts (this runs for
    every answered image; the models above document and check the shape)."""
    return {
        "image": {"width": width, "height": height, "sha256": sha256},
        "detections": [{"box": {"x1": d.box.x1, "y1": d.box.y1, "x2": d.box.x2, "y2": d.box.y2},
                        "class_id": d.class_id, "class_name": class_names[d.class_id],
                        "confidence": d.confidence, "raw_confidence": d.raw_confidence} for d in detections],
        "model": model.model_dump(),
    }


def error_response(code: str, detail: str, status: int, *, retry_after: int | None = None) -> JSONResponse:
    """The one error shape: `{"error": code, "detail": message}` (and `Retry-After` when given)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(ErrorBody(error=code, detail=detail).model_dump(), status_code=status, headers=headers)
