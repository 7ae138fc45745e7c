"""Request models of the public endpoints, parsed strictly from multipart/form-data.

BentoML's default multipart parser JSON-decodes any unexpected field (a misnamed file field is then a
500) and fetches a file field given as text from the URL it holds. Here the form is checked first:
file fields must be uploaded files, other fields plain values, unknown fields are named. Problems are
raised as a pydantic ValidationError, which BentoML answers with 400 and serving/guard.py rewrites
into the project's error body.

A single-image endpoint also takes the image as the raw request body (`Content-Type: image/jpeg`,
`image/png`, ...; the options then come as query parameters): the bytes go to the service as they are,
with no multipart parsing and no temporary file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_origin

from bentoml import IODescriptor
from pydantic import Field
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request


def _problem(field: str, kind: str, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=None)


class StrictForm(IODescriptor):
    """Base of the input models: see the module docstring."""

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> IODescriptor:
        """Parse and validate the request's form or raw image body (BentoML calls this for every request)."""
        fields = ", ".join(sorted(cls.model_fields, key=lambda k: not cls.model_fields[k].is_required()))
        content_type = request.headers.get("content-type", "")
        raw_field = cls._raw_body_field()
        if raw_field and content_type.split(";")[0].strip().lower().startswith("image/"):
            return await cls._from_raw_body(request, raw_field)
        if not content_type.startswith("multipart/form-data"):
            also = ", or the image as the request body (Content-Type image/...)" if raw_field else ""
            raise ValidationError.from_exception_data(cls.__name__, [_problem(
                "request", "not_multipart",
                f"expected multipart/form-data with fields {fields}{also}, got {content_type or 'no content type'!r}")])
        form = await request.form()
        data: dict[str, Any] = {}
        problems = []
        for key in form:
            values = form.getlist(key)
            if key not in cls.model_fields:
                problems.append(_problem(key, "unknown_field", f"unknown field (expected: {fields})"))
            elif key in cls.multipart_fields:
                if not all(isinstance(v, UploadFile) for v in values):
                    problems.append(_problem(key, "not_a_file", "expected an uploaded file, got a text value"))
                data[key] = values if get_origin(cls.model_fields[key].annotation) is list else values[0]
            elif isinstance(values[0], UploadFile):
                problems.append(_problem(key, "not_a_value", "expected a value, got a file"))
            else:
                try:
                    data[key] = json.loads(values[0])
                except ValueError:
                    data[key] = values[0]  # a bare string: the field's own type decides
        problems += [_problem(k, "missing", f"Field required (send the file as form field '{k}')")
                     for k, f in cls.model_fields.items() if f.is_required() and k not in form]
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return cls.model_validate(data)

    @classmethod
    def _raw_body_field(cls) -> str | None:
        """The one file field of a single-file form (it may come as the raw body), else None."""
        files = [k for k in cls.multipart_fields if get_origin(cls.model_fields[k].annotation) is not list]
        return files[0] if len(files) == 1 and len(cls.multipart_fields) == 1 else None

    @classmethod
    async def _from_raw_body(cls, request: Request, field: str) -> IODescriptor:
        """The options from the query string, validated like form fields; the body's bytes as the file
        (the service reads `bytes` as the upload itself: nothing is spooled to disk)."""
        data: dict[str, Any] = {}
        problems = []
        for key in request.query_params:
            values = request.query_params.getlist(key)
            if key not in cls.model_fields or key == field:
                problems.append(_problem(key, "unknown_field", "unknown query parameter (expected: "
                                         f"{', '.join(k for k in cls.model_fields if k != field)})"))
                continue
            try:
                data[key] = json.loads(values[0])
            except ValueError:
                data[key] = values[0]
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        body = await request.body()
        # Validate the options with a placeholder file, then put the bytes in its place.
        validated = cls.model_validate({**data, field: Path("request-body")})
        return cls.model_construct(**{**dict(validated), field: body})


class DetectionOptions(StrictForm):
    """The detection parameters every image endpoint takes (defaults: the model card's thresholds)."""

    conf: float | None = Field(None, ge=0, le=1, description="minimum calibrated confidence (default: model card)",
                               examples=[0.25])
    iou: float | None = Field(None, gt=0, le=1, description="NMS IoU threshold (default: model card)",
                              examples=[0.45])
    max_det: int | None = Field(None, ge=1, description="most detections per image (default: model card)",
                                examples=[100])
    classes: list[int] | None = Field(None, description="keep only these class ids (default: all)",
                                      examples=[[0, 2]])


class DetectInput(DetectionOptions):
    image: Path = Field(description="the image file (JPEG, PNG, WEBP, BMP, GIF or TIFF)")


class DetectBatchInput(DetectionOptions):
    images: list[Path] = Field(description="several image files, in the order of the results")
