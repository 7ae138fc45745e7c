"""The one client-side helper for the service's API keys: every client in the repository (Locust, the
benchmarks, `detops simulate`, the loop demo, `detops batch submit`, the deployment's checks) takes its
key from DETOPS_API_KEY through `auth_headers()`. Light on purpose: no server-side imports."""

from __future__ import annotations

import os
from collections.abc import Mapping

API_KEY_ENV = "DETOPS_API_KEY"


def api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The key of DETOPS_API_KEY, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(API_KEY_ENV, "").strip()
    return value or None


def auth_headers(key: str | None = None) -> dict[str, str]:
    """`{"Authorization": "Bearer <key>"}` for `key`, else DETOPS_API_KEY's; {} when there is none
    (a service with authentication off accepts that; one with it on answers 401 naming the header)."""
    key = key or api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}
