"""``slidemil heatmap``: attention files -> heat-map figures, galleries, QuPath and TIFF exports."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.heatmaps.config import HeatmapConfig

H = HeatmapConfig.field_help


@app.command()
@friendly_errors
def heatmap(
    predictions: Path = typer.Argument(
        ..., help="Folder written by `slidemil predict --out` (with attention/)."
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Output folder (default: PREDICTIONS/heatmaps)."
    ),
    normalisation: str = typer.Option(None, help=H("normalisation")),
    model: str = typer.Option(None, "--model", "-m", help=H("model")),
    class_name: str = typer.Option(None, "--class", help=H("class_name")),
    cmap: str = typer.Option(None, help=H("cmap")),
    alpha: float = typer.Option(None, help=H("alpha")),
    smooth: float = typer.Option(None, help=H("smooth")),
    thumbnail_size: int = typer.Option(None, help=H("thumbnail_size")),
    top_k: int = typer.Option(None, help=H("top_k")),
    geojson: bool = typer.Option(None, "--geojson/--no-geojson", help=H("geojson")),
    tiff: bool = typer.Option(None, "--tiff/--no-tiff", help=H("tiff")),
    cohort: Path = typer.Option(None, help=H("cohort")),
    shard: str = typer.Option(None, help=H("shard")),
    workers: int = typer.Option(None, "--workers", "-j", help=H("workers")),
    strict: bool = typer.Option(None, "--strict/--no-strict", help=H("strict")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    reader: str = typer.Option(None, help=H("reader")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'heatmap' section."),
) -> None:
    """Draw each predicted slide's attention at its patches' true footprints: an overlay with a
    colour bar and the predicted class (<slide_id>.png), the top and bottom patches
    (<slide_id>_gallery.png), QuPath tiles (<slide_id>.geojson) and, with --tiff, a pyramidal
    TIFF that OpenSlide and QuPath open at full resolution. --class draws one class's scores
    (or each class's, with --class all)."""
    from slidemil.heatmaps import heatmap as run_heatmap

    options = dict(
        normalisation=normalisation, model=model, class_name=class_name, cmap=cmap, alpha=alpha,
        smooth=smooth, thumbnail_size=thumbnail_size, top_k=top_k, geojson=geojson, tiff=tiff,
        cohort=cohort, shard=shard, workers=workers, strict=strict, quiet=quiet, reader=reader,
    )  # fmt: skip
    summary = run_heatmap(predictions, out, config_file=config, **options)
    target = out if out is not None else predictions / "heatmaps"
    typer.echo(f"{summary.line()} -> {target}")
    if summary.failed:
        typer.echo(f"failures: {target / 'failures.csv'}")
