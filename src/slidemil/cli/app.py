"""The typer application and the helpers every command shares."""

from __future__ import annotations

import inspect
import logging
import os
import re
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


def summary_line(docstring: str | None, limit: int = 90) -> str:
    """The first sentence of a docstring for the command list (``--help`` of one command keeps
    the whole text); a longer sentence is cut at its first colon or semicolon outside brackets."""
    paragraph = inspect.cleandoc(docstring or "").split("\n\n")[0]
    sentence = re.split(r"(?<=\.)\s", " ".join(paragraph.split()), maxsplit=1)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    depth = 0
    for i, char in enumerate(sentence):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth == 0 and char in ":;" and sentence[i + 1 : i + 2] == " ":
            return sentence[:i]
    return sentence


def main() -> None:
    # Register the commands (each module adds itself to ``app``): only the one being run, so
    # its start-up does not import every stage; all of them for help and unknown commands.
    from slidemil.cli.command_index import invoked_command, register

    command = invoked_command(sys.argv[1:])
    register(None if command is None else [command])
    for info in app.registered_commands:
        if info.short_help is None and info.callback is not None:
            info.short_help = summary_line(info.callback.__doc__)
    app(prog_name="slidemil")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
