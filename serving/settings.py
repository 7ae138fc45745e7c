"""Serving settings: the `serve:` section of params.yaml, then DETOPS_SERVE_<FIELD> environment
variables on top, validated together by `ServeConfig` when the service module is imported."""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml
from pydantic import ValidationError

from pipelines.config.base import format_validation_error, load_section, params_path
from pipelines.config.serving import ServeConfig
from pipelines.errors import DetopsError
from serving.runtime import available_cores

ENV_PREFIX = "DETOPS_SERVE_"


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The DETOPS_SERVE_* variables as {field: value}; values are read as YAML scalars so that
    `16`, `true` and `null` get their types. An unknown field is an error naming the variable."""
    environ = os.environ if environ is None else environ
    fields = set(ServeConfig.model_fields)
    updates: dict[str, object] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX):].lower()
        if field not in fields:
            raise DetopsError(f"{key}: unknown serve setting (known: {', '.join(sorted(fields))})")
        try:
            updates[field] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            updates[field] = raw  # not YAML: let the field's own validation judge the string
    return updates


def load_serve_config(environ: Mapping[str, str] | None = None) -> ServeConfig:
    """ServeConfig from params.yaml with the environment overrides applied; a bad value raises a
    DetopsError naming the setting and, for an override, its variable."""
    base = load_section(ServeConfig)
    updates = env_overrides(environ)
    if not updates:
        return base
    try:
        return ServeConfig.model_validate({**base.model_dump(), **updates})
    except ValidationError as exc:
        message = format_validation_error(params_path(), exc, "serve")
        for field in updates:
            message = message.replace(f"serve.{field}:", f"serve.{field} ({ENV_PREFIX}{field.upper()}):")
        raise DetopsError(message) from None


def ort_threads(cfg: ServeConfig) -> int:
    """ONNX Runtime intra-op threads per worker: the setting, else the machine's cores shared
    evenly among the workers (more threads than cores only adds contention)."""
    if cfg.threads is not None:
        return cfg.threads
    return max(1, available_cores() // cfg.workers)
