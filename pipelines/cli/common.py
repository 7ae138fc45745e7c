"""What every verb module shares: the Typer app, the root options and the one-line error handling."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines import environment
from pipelines.config.base import PARAMS_ENV
from pipelines.errors import DetopsError

app = typer.Typer(
    name="detops",
    help="Object-detection lifecycle: Label Studio -> dataset -> YOLO -> registry -> BentoML -> drift.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    params: Annotated[Optional[Path], typer.Option("--params", help="params file (default ./params.yaml)")] = None,
) -> None:
    if params is not None:
        os.environ[PARAMS_ENV] = str(params)
    environment.configure()


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` in red on stderr and exit with `code`."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DetopsError into one red line on stderr and its exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DetopsError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper
