"""The API's own documentation: `/docs.json` (OpenAPI 3.1) and the page at `/`.

BentoML 1.4.39 writes its document under an OpenAPI 3.0.2 header while its schemas come from
pydantic v2, which writes JSON Schema 2020-12 (`exclusiveMinimum: 0` as a number, `type: file` for
uploads): no validator or client generator accepts that as 3.0. JSON Schema 2020-12 *is* OpenAPI
3.1's schema dialect, so the document is declared 3.1 and the few non-schema bits are fixed here:
file fields become `string`/`binary`, BentoML's error schemas become the project's error body, every
status an operation can answer is listed (401/403/429/503 from the gateway, 413/415/422 from the
upload checks), the key schemes are declared (Swagger UI's "Authorize" button takes a key), and
BentoML's boilerplate (badges fetched from the internet, "Contact BentoML Team", version "None") is
replaced by what a client of detops needs: routes, limits, how to get a key, which model answers.
The page at `/` uses only the Swagger UI assets BentoML serves from this same server.
"""

from __future__ import annotations

import copy
import html
import json
from typing import Any

from serving.gateway.scopes import is_public, required_scope

OPENAPI_VERSION = "3.1.0"
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
SECURITY = [{"bearerKey": []}, {"apiKeyHeader": []}]
_GATEWAY_ERRORS = {
    "401": "no key, or a key that is unknown or revoked (`missing_key`, `invalid_key`)",
    "403": "the key lacks the route's scope (`insufficient_scope`)",
    "429": "over a per-key rate or a tenant quota (`rate_limited`, `quota_exceeded`); see Retry-After",
    "503": "overloaded, circuit open, or a dependency down; see Retry-After",
}
_UPLOAD_ERRORS = {
    "400": "bad request: a missing, misnamed or malformed field (the detail names it)",
    "413": "over an upload limit (`file_too_large`, `too_many_images`)",
    "415": "not an image, or an unsupported format",
    "422": "too many pixels, corrupt image, unknown class",
    "500": "the model failed on this request (`inference_failed`)",
}


_BENTOML_ERRORS = ("InvalidArgument", "NotFound", "InternalServerError")


def _fix_schema(node: Any) -> Any:
    """Walk a schema: `type: file` -> `string`/`binary`; drop `default: null` on non-null types."""
    if isinstance(node, dict):
        node = {k: _fix_schema(v) for k, v in node.items()}
        if node.get("type") == "file":
            node["type"] = "string"
            node["format"] = "binary"
        if "default" in node and node["default"] is None and node.get("type") not in (None, "null"):
            del node["default"]
        return node
    if isinstance(node, list):
        return [_fix_schema(v) for v in node]
    return node


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def openapi_document(spec: dict[str, Any], *, model_version: str, description: str) -> dict[str, Any]:
    """BentoML's generated `spec` turned into a valid OpenAPI 3.1 document of detops' API."""
    doc = _fix_schema(copy.deepcopy(spec))
    doc["openapi"] = OPENAPI_VERSION
    doc["info"] = {"title": "detops detection API", "version": model_version, "description": description,
                   "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}}
    doc.pop("servers", None)
    doc["tags"] = [{"name": "Detection", "description": "synchronous detection (scope `detect`)"},
                   {"name": "Jobs", "description": "durable async and batch jobs (scopes `jobs:write`, `jobs:read`)"},
                   {"name": "Infrastructure", "description": "probes and metrics (no key)"}]
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in (*_BENTOML_ERRORS, "TaskStatusResponse"):
        schemas.pop(name, None)
    doc["components"]["securitySchemes"] = {
        "bearerKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    doc["paths"].pop("/healthz", None)  # BentoML's alias of /livez
    for path, item in doc["paths"].items():
        for method, op in item.items():
            op.pop("x-bentoml-name", None)
            responses = op.setdefault("responses", {})
            for code, response in list(responses.items()):  # BentoML's own error schemas: the project's body
                if any(f"/{name}" in json.dumps(response) for name in _BENTOML_ERRORS):
                    responses[code] = _error_response(response.get("description", ""))
            if is_public(path):
                op["tags"] = ["Infrastructure"]
                op["security"] = []
                continue
            op["security"] = SECURITY
            scope = required_scope(method.upper(), path)
            op["description"] = f"{op.get('description', '')}\n\nScope: `{scope}`.".strip()
            if not path.startswith("/jobs"):
                op["tags"] = ["Detection"]
                responses.pop("404", None)
                for code, what in _UPLOAD_ERRORS.items():
                    responses.setdefault(code, _error_response(what))
            for code, what in _GATEWAY_ERRORS.items():
                responses.setdefault(code, _error_response(what))
    probes = doc["paths"]
    if "/readyz" in probes:
        probes["/readyz"]["get"]["responses"] = {
            "200": {"description": "this instance can serve /detect; the body names any dependency that is down "
                                   "and, under job_workers, how many job workers are alive (0: POST /jobs still "
                                   "accepts, but no worker is consuming) and the oldest queued job's age",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "503": {"description": "not ready: model not loaded or circuit open",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}
    return doc


def api_description(*, model: str, model_version: str, limits: dict[str, str], auth: bool) -> str:
    """The Markdown shown at the top of `/` and in `info.description`."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in limits.items())
    access = ("Every route except `/livez`, `/readyz`, `/metrics` and this documentation needs a key: "
              "`Authorization: Bearer <key>` or `X-API-Key: <key>`. Ask an operator for one "
              "(`detops keys create --tenant <you> --scopes detect,jobs:write,jobs:read`; the key is the last "
              "line it prints) and paste it into **Authorize** below. Missing or unknown key: 401; a key "
              "without the route's scope: 403; over a limit: 429 with `Retry-After`."
              if auth else "**Authentication is OFF on this instance (local experiments only).**")
    return f"""Object detection with a calibrated YOLO model. Answering now: **{model}** version **{model_version}**.

{access}

| route | what | scope |
|---|---|---|
| `POST /detect` | one image (multipart field `image`) -> detections JSON | `detect` |
| `POST /detect_batch` | several images (field `images`, repeated) -> a list, in upload order | `detect` |
| `POST /render` | one image -> JPEG with the boxes drawn | `detect` |
| `POST /jobs` | a durable job of many images (multipart or JSON base64) -> 202 and a job id | `jobs:write` |
| `GET /jobs/{{id}}`, `GET /jobs/{{id}}/results` | a job's status; its results as JSON Lines or COCO | `jobs:read` |
| `DELETE /jobs/{{id}}` | cancel a job, delete its images and results | `jobs:write` |
| `GET /livez`, `/readyz`, `/metrics` | probes (the `/readyz` body lists dependencies), Prometheus | none |

A tenant only ever sees its own jobs: another tenant's job id answers 404.

| limit | value |
|---|---|
{rows}

Every error is JSON: `{{"error": "<code>", "detail": "<what, naming the field or limit>"}}`."""


def index_page(title: str, description_html: str) -> str:
    """The page at `/`: detops' own header and Swagger UI, assets served by this server only."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<link rel="stylesheet" href="./static_content/swagger-ui.css">
<link rel="icon" href="./static_content/favicon-light-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true,
  persistAuthorization: true, tryItOutEnabled: true}});
</script>
<noscript>{description_html}</noscript>
</body></html>"""
