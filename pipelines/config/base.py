"""Reading params.yaml: the base of every section model, and the loader.

Each stage group keeps its section models in its own module (`pipelines.config.data`, `.model`,
`.serving`, `.monitoring`, ...), and a verb validates only the section it reads. So a stage depends
on the code of its own section, and adding a section for a new verb changes no other stage's
dependencies (dvc.yaml lists the modules each stage imports). Unknown keys and wrong types are refused
with a one-line message naming the key, e.g. ``params.yaml: train.epochs: Input should be a valid
integer (got 'ten')``. Paths are relative to the working directory, as DVC runs stages from the
repository root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.errors import DetopsError

PARAMS_ENV = "DETOPS_PARAMS"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, defaults are validated too. `section` is the
    key of params.yaml a top-level section model reads (nested models leave it empty)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)
    section: ClassVar[str] = ""


S = TypeVar("S", bound=Section)


def params_path(path: Path | str | None = None) -> Path:
    """The params file: the argument, else $DETOPS_PARAMS, else ./params.yaml."""
    return Path(path or os.environ.get(PARAMS_ENV) or "params.yaml")


def read_params(path: Path | str | None = None) -> dict[str, Any]:
    """params.yaml as a mapping of sections, unvalidated; a missing file is an empty mapping."""
    file = params_path(path)
    if not file.exists():
        return {}
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DetopsError(f"{file}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, binary content
        raise DetopsError(f"{file}: cannot read the params file ({exc})") from None
    if not isinstance(raw, dict):
        raise DetopsError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_section(model: type[S], path: Path | str | None = None, /, **overrides: Any) -> S:
    """The section `model.section` of params.yaml, validated, with the non-None `overrides` applied
    and validated like the file."""
    if not model.section:
        raise TypeError(f"{model.__name__} is not a top-level section (no `section` name)")
    file = params_path(path)
    raw = read_params(file).get(model.section) or {}
    if not isinstance(raw, dict):
        raise DetopsError(f"{file}: {model.section}: expected a mapping of keys, got {type(raw).__name__}")
    updates = {k: v for k, v in overrides.items() if v is not None}
    try:
        return model.model_validate({**raw, **updates})
    except ValidationError as exc:
        raise DetopsError(format_validation_error(file, exc, model.section)) from None


def override(section: S, /, *, file: Path | str = "params.yaml", **overrides: Any) -> S:
    """A copy of `section` with the non-None overrides applied, validated like the file."""
    updates = {k: v for k, v in overrides.items() if v is not None}
    if not updates:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **updates})
    except ValidationError as exc:
        raise DetopsError(format_validation_error(Path(file), exc, type(section).section)) from None


def format_validation_error(file: Path, exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted key: `params.yaml: train.epochs: ...`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"{file}: {loc}: {msg}{got}")
    return "; ".join(lines)
