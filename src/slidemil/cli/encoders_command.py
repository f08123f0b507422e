"""``slidemil encoders``: the encoder registry as a table."""

from __future__ import annotations

import typer

from slidemil.cli.app import app, friendly_errors

COLUMNS = ("name", "output_dim", "input_size", "weights", "gated", "extra", "licence")


@app.command()
@friendly_errors
def encoders(
    pattern: str = typer.Argument("*", help="Shell pattern over names, e.g. 'resnet*'."),
) -> None:
    """List the registered patch encoders: output size, input size, weights source, gating,
    required extra and licence."""
    from slidemil.encoders import get_encoder_spec, list_encoders

    rows = [get_encoder_spec(name).card() for name in list_encoders(pattern)]
    cells = [[_cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(COLUMNS)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip())
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
