"""``slidemil extract``: encode every patch of a work folder with a registered encoder."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.extraction.config import ExtractConfig

H = ExtractConfig.field_help


@app.command()
@friendly_errors
def extract(
    work: Path = typer.Argument(
        ..., help="Work folder made by `slidemil patch` (cohort.csv, patches/)."
    ),
    encoder: str = typer.Option(None, "--encoder", "-e", help=H("encoder")),
    weights: str = typer.Option(None, help=H("weights")),
    revision: str = typer.Option(None, help=H("revision")),
    device: str = typer.Option(None, help=H("device")),
    batch_size: int = typer.Option(None, help=H("batch_size")),
    workers: int = typer.Option(None, "--workers", "-j", help=H("workers")),
    prefetch: int = typer.Option(None, help=H("prefetch")),
    dtype: str = typer.Option(None, help=H("dtype")),
    precision: str = typer.Option(None, help=H("precision")),
    reader: str = typer.Option(None, help=H("reader")),
    decode: str = typer.Option(None, help=H("decode")),
    features_name: str = typer.Option(None, help=H("features_name")),
    shard: str = typer.Option(None, help=H("shard")),
    views: int = typer.Option(None, help=H("views")),
    augment: str = typer.Option(None, help=H("augment")),
    augment_strength: str = typer.Option(None, help=H("augment_strength")),
    augment_seed: int = typer.Option(None, help=H("augment_seed")),
    stain_norm: str = typer.Option(None, help=H("stain_norm")),
    stain_target: Path = typer.Option(None, help=H("stain_target")),
    strict: bool = typer.Option(None, "--strict/--no-strict", help=H("strict")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'extract' section."),
) -> None:
    """Encode the patches of every slide into features/<encoder>/<slide_id>.h5 (resumable;
    under torchrun each rank takes its own slides and GPU).

    With --views K each file also holds K augmented views of every patch (e.g. --views 4
    --augment flip,rot90,hed,colour,blur --augment-strength hed=0.05,blur=1.0); with
    --stain-norm macenko --stain-target PATCH.png every patch is stain-normalised first."""
    from slidemil.config import build
    from slidemil.extraction import extract as run_extract

    options = dict(
        encoder=encoder, weights=weights, revision=revision, device=device,
        batch_size=batch_size, workers=workers, prefetch=prefetch, dtype=dtype,
        precision=precision, features_name=features_name, shard=shard, strict=strict, quiet=quiet,
        reader=reader, decode=decode, views=views, augment=augment,
        augment_strength=augment_strength, augment_seed=augment_seed, stain_norm=stain_norm,
        stain_target=None if stain_target is None else str(stain_target),
    )  # fmt: skip
    resolved = build(ExtractConfig, section="extract", config_file=config, overrides=options)
    summary = run_extract(work, resolved)
    if summary.failed:
        typer.echo(f"{len(summary.failed)} slide(s) failed: see failures.csv", err=True)
