"""``slidemil view``: a predictions folder in the browser, the slides at full resolution."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.viewer.config import ViewerConfig

H = ViewerConfig.field_help


@app.command()
@friendly_errors
def view(
    predictions: Path = typer.Argument(
        ..., help="Folder written by `slidemil predict --out` (predictions.csv, attention/)."
    ),
    run: Path = typer.Option(None, "--run", help=H("run")),
    port: int = typer.Option(None, "--port", "-p", help=H("port")),
    host: str = typer.Option(None, "--host", help=H("host")),
    cohort: Path = typer.Option(None, help=H("cohort")),
    normalisation: str = typer.Option(None, help=H("normalisation")),
    cmap: str = typer.Option(None, help=H("cmap")),
    smooth: float = typer.Option(None, help=H("smooth")),
    top_k: int = typer.Option(None, help=H("top_k")),
    tile_size: int = typer.Option(None, help=H("tile_size")),
    tile_cache_mb: int = typer.Option(None, help=H("tile_cache_mb")),
    page_size: int = typer.Option(None, help=H("page_size")),
    reader: str = typer.Option(None, help=H("reader")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'view' section."),
) -> None:
    """Serve the predicted slides to a web browser: a sortable list with each slide's prediction
    and label, and each slide at full resolution with its attention over it (opacity, maps,
    patch grid, top and bottom patches, scale bar, the score under the pointer). Listens on
    127.0.0.1 only unless --host says otherwise; on a remote machine, tunnel the port with
    `ssh -L 8000:127.0.0.1:8000 HOST`. Stop with Ctrl-C."""
    from slidemil.config import build
    from slidemil.viewer.run import EXPOSED_WARNING, ViewerServer

    options = dict(
        run=run, port=port, host=host, cohort=cohort, normalisation=normalisation, cmap=cmap,
        smooth=smooth, top_k=top_k, tile_size=tile_size, tile_cache_mb=tile_cache_mb,
        page_size=page_size, reader=reader,
    )  # fmt: skip
    resolved = build(ViewerConfig, section="view", config_file=config, overrides=options)
    server = ViewerServer(predictions, resolved)
    if server.exposed:
        warning = EXPOSED_WARNING.format(host=resolved.host, port=server.port)
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"slidemil viewer on {server.url}  (Ctrl-C to stop)")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a user stops it
        server.serve()
