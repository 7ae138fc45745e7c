"""Structured logs: one JSON object per line on stderr for the gateway's access log
(`detops.access`), with the request id, tenant and key id (never the key, never image bytes: the
gateway logs only method, path, status and duration), and the same three fields added to every
other record of the service's loggers so that an error can be traced to its request."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from serving.gateway.context import RequestContextFilter

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: time, level, logger, message, request_id, tenant, key_id and extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure() -> None:
    """JSON access log on stderr; request context on the project's loggers (idempotent)."""
    access = logging.getLogger("detops.access")
    if not any(isinstance(h.formatter, JsonFormatter) for h in access.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestContextFilter())
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    for name in ("serving", "monitoring", "detops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RequestContextFilter) for f in logger.filters):
            logger.addFilter(RequestContextFilter())
