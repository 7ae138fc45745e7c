"""Which routes need a key, and which scope each needs.

Public (no key): the probes (the Open Inference Protocol's /v2/health/* too), /metrics (it holds no
tenant data: labels are model, reason, result), and the API's documentation (`/`, `/docs.json`,
Swagger UI's local assets). Everything else needs a key; a route not listed here needs `admin` (deny by
default: a route added later is closed until it is given a scope here).
"""

from __future__ import annotations

SCOPES = ("detect", "jobs:write", "jobs:read", "admin")
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json",
                          "/v2/health/live", "/v2/health/ready"})
PUBLIC_PREFIXES = ("/static_content/",)

_ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/detect"): "detect",
    ("POST", "/detect_batch"): "detect",
    ("POST", "/render"): "detect",
    ("POST", "/jobs"): "jobs:write",
}


def is_public(path: str) -> bool:
    """True for the routes anyone may call."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def required_scope(method: str, path: str) -> str:
    """The scope a request needs (`admin` for anything unknown)."""
    scope = _ROUTES.get((method, path))
    if scope is not None:
        return scope
    if path in ("/v2", "/v2/") or path.startswith("/v2/models/"):  # Open Inference Protocol: metadata, infer
        return "detect"
    if path.startswith("/jobs/"):
        if method in ("GET", "HEAD"):
            return "jobs:read"
        if method == "DELETE":
            return "jobs:write"
    return "admin"


def allows(granted: frozenset[str] | set[str], needed: str) -> bool:
    """`admin` can do everything; otherwise the exact scope is needed."""
    return needed in granted or "admin" in granted


def parse_scopes(text: str) -> tuple[str, ...]:
    """`detect,jobs:read` -> ('detect', 'jobs:read'); an unknown scope is a ValueError naming the known ones."""
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes {text!r}: unknown {unknown or 'none given'} (known: {', '.join(SCOPES)})")
    return scopes
