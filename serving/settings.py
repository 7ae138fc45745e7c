"""Service settings: a section of params.yaml, then environment variables on top, validated together.

`serve:` takes DETOPS_SERVE_<FIELD> overrides (`ServeConfig`, read when the service module is
imported); `jobs:` takes DETOPS_JOBS_<FIELD> (`JobsConfig`, read by the jobs routes and the workers);
`gateway:` takes DETOPS_GATEWAY_<FIELD> (`GatewayConfig`: keys, limits, degradation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

import yaml
from pydantic import ValidationError

from pipelines.config.base import Section, format_validation_error, load_section, params_path
from pipelines.config.gateway import GatewayConfig
from pipelines.config.jobs import JobsConfig
from pipelines.config.serving import ServeConfig
from pipelines.errors import DetopsError
from serving.runtime import available_cores

ENV_PREFIX = "DETOPS_SERVE_"
JOBS_ENV_PREFIX = "DETOPS_JOBS_"
GATEWAY_ENV_PREFIX = "DETOPS_GATEWAY_"

S = TypeVar("S", bound=Section)


def env_overrides(environ: Mapping[str, str] | None = None, *, model: type[Section] = ServeConfig,
                  prefix: str = ENV_PREFIX) -> dict[str, object]:
    """The `prefix`* variables as {field: value}; values are read as YAML scalars so that `16`,
    `true`, `null` and `[a, b]` get their types. An unknown field is an error naming the variable."""
    environ = os.environ if environ is None else environ
    fields = set(model.model_fields)
    updates: dict[str, object] = {}
    for key, raw in environ.items():
        if not key.startswith(prefix):
            continue
        field = key[len(prefix):].lower()
        if field not in fields:
            raise DetopsError(f"{key}: unknown {model.section} setting (known: {', '.join(sorted(fields))})")
        try:
            updates[field] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            updates[field] = raw  # not YAML: let the field's own validation judge the string
    return updates


def load_with_env(model: type[S], prefix: str, environ: Mapping[str, str] | None = None) -> S:
    """The section `model` from params.yaml with the `prefix` overrides applied; a bad value raises
    a DetopsError naming the setting and, for an override, its variable."""
    base = load_section(model)
    updates = env_overrides(environ, model=model, prefix=prefix)
    if not updates:
        return base
    try:
        return model.model_validate({**base.model_dump(), **updates})
    except ValidationError as exc:
        message = format_validation_error(params_path(), exc, model.section)
        for field in updates:
            message = message.replace(f"{model.section}.{field}:",
                                      f"{model.section}.{field} ({prefix}{field.upper()}):")
        raise DetopsError(message) from None


def load_serve_config(environ: Mapping[str, str] | None = None) -> ServeConfig:
    """ServeConfig from params.yaml with the DETOPS_SERVE_* overrides applied."""
    return load_with_env(ServeConfig, ENV_PREFIX, environ)


def load_jobs_config(environ: Mapping[str, str] | None = None) -> JobsConfig:
    """JobsConfig from params.yaml with the DETOPS_JOBS_* overrides applied."""
    return load_with_env(JobsConfig, JOBS_ENV_PREFIX, environ)


def load_gateway_config(environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """GatewayConfig from params.yaml with the DETOPS_GATEWAY_* overrides applied."""
    return load_with_env(GatewayConfig, GATEWAY_ENV_PREFIX, environ)


def ort_threads(cfg: ServeConfig) -> int:
    """ONNX Runtime intra-op threads per worker: the setting, else the machine's cores shared
    evenly among the workers (more threads than cores only adds contention)."""
    if cfg.threads is not None:
        return cfg.threads
    return max(1, available_cores() // cfg.workers)
