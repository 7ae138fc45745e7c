"""ASGI middleware in front of the service's routes:

- every response says which registry version answered (`X-Model-Version`), errors included; not
  those of `/jobs`, whose results each name the version a worker ran them with;
- the request's traffic kind, which the deployment states in `X-Detops-Traffic` (`smoke`, `shadow` or
  `canary` for the new colour during a rollout's verification; the front door overwrites any client's
  value), is put in `REQUEST_TRAFFIC` for the prediction log; anything else is `live`;
- a request whose Content-Length is over what the endpoint can accept is refused with 413 before its
  body is read;
- BentoML's own 400 for a request that does not match an endpoint's signature (missing or misnamed
  field, wrong type) is rewritten into the project's `{"error", "detail"}` body naming the fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from monitoring.store import TRAFFIC
from serving import metrics
from serving.schemas import ErrorBody

MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the files
REQUEST_TRAFFIC: ContextVar[str] = ContextVar("request_traffic", default="live")

Scope = dict[str, Any]
Message = dict[str, Any]


class RequestGuard:
    """See the module docstring. `upload_limits` maps a route to the largest body it accepts and
    the setting that sets it; `model_version` gives the version to announce (called once, when the
    first request comes)."""

    def __init__(self, app: Callable[..., Any], upload_limits: dict[str, tuple[int, str]],
                 model_version: Callable[[], str]) -> None:
        self.app = app
        self.upload_limits = upload_limits
        self.model_version = model_version
        self._version_header: tuple[bytes, bytes] | None = None

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if not path.startswith("/jobs"):  # a job's results name their own versions (a worker ran them)
            if self._version_header is None:
                self._version_header = (b"x-model-version", self.model_version().encode())
            send = _WithHeader(send, self._version_header)
        traffic = _header(scope, b"x-detops-traffic").decode("latin-1")
        REQUEST_TRAFFIC.set(traffic if traffic in TRAFFIC else "live")
        limit, setting = self.upload_limits.get(path, (None, ""))
        length = _header(scope, b"content-length") if limit is not None else b""
        if limit is not None and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            metrics.BAD_INPUT.labels(reason="file_too_large").inc()
            return await _send_error(send, 413, "file_too_large",
                                     f"request body of {int(length)} bytes is over the limit of {limit} bytes "
                                     f"for {path} ({setting})")
        await self.app(scope, receive, _ValidationRewriter(send))


class _WithHeader:
    """Adds one header to the response's start message."""

    def __init__(self, send: Callable[..., Any], header: tuple[bytes, bytes]) -> None:
        self.send = send
        self.header = header

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), self.header]}
        await self.send(message)


class _ValidationRewriter:
    """Holds back a 400 JSON response and, when it is BentoML's validation error (a list of
    pydantic errors as `detail`), sends the project's error body instead."""

    def __init__(self, send: Callable[..., Any]) -> None:
        self.send = send
        self.start: Message | None = None
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            self.start = message
            return
        if self.start is None:
            return await self.send(message)
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return
        rewritten = _rewrite(self.body)
        if rewritten is None:
            await self.send(self.start)
            return await self.send({"type": "http.response.body", "body": self.body})
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(rewritten)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": rewritten})


def _rewrite(body: bytes) -> bytes | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("detail"), list):
        return None
    problems = [f"{'.'.join(str(p) for p in err.get('loc', ())) or 'request'}: {err.get('msg', 'invalid')}"
                for err in data["detail"]]
    code = "missing_field" if any(err.get("type") == "missing" for err in data["detail"]) else "invalid_parameter"
    metrics.BAD_INPUT.labels(reason=code).inc()
    return ErrorBody(error=code, detail="; ".join(problems)).model_dump_json().encode()


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return b""


async def _send_error(send: Callable[..., Any], status: int, code: str, detail: str) -> None:
    body = ErrorBody(error=code, detail=detail).model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
