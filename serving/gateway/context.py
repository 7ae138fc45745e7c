"""Who is asking, for the request being handled: its id and tenant (contextvars, set by the gateway
middleware), and the log filter that puts both on every log line of the request."""

from __future__ import annotations

import logging
from contextvars import ContextVar

TENANT: ContextVar[str] = ContextVar("detops_tenant", default="-")
KEY_ID: ContextVar[str] = ContextVar("detops_key_id", default="-")
REQUEST_ID: ContextVar[str] = ContextVar("detops_request_id", default="-")
NO_AUTH_TENANT = "local"  # the tenant of every request when authentication is off


def current_tenant() -> str:
    """The tenant of the request being handled (`local` with authentication off)."""
    tenant = TENANT.get()
    return NO_AUTH_TENANT if tenant == "-" else tenant


class RequestContextFilter(logging.Filter):
    """Adds `request_id`, `tenant` and `key_id` to every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.tenant = TENANT.get()
        record.key_id = KEY_ID.get()
        return True
