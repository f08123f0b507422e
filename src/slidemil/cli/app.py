"""The typer application and the helpers every command shares."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from slidemil import __version__
from slidemil.errors import SlidemilError

app = typer.Typer(
    name="slidemil",
    help="Attention-MIL for whole-slide images: synth, patch, extract, train, evaluate, predict, "
    "heatmap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slidemil {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a SlidemilError as one line on stderr and exit 2 instead of a traceback."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SlidemilError as e:
            # Under torchrun every rank fails alike; one copy of the message is enough.
            if os.environ.get("RANK", "0") == "0":
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from e

    return wrapper


def parse_floats(text: str | None) -> list[float] | None:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers") from e


def main() -> None:
    # Register the commands (each module adds itself to ``app``).
    from slidemil.cli import commands  # noqa: F401

    app(prog_name="slidemil")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
