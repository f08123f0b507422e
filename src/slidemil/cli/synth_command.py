"""``slidemil synth``: write a synthetic cohort of real SVS slides."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors, parse_floats
from slidemil.synthetic.cohort import SynthConfig

H = SynthConfig.field_help


@app.command()
@friendly_errors
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    slides: int = typer.Option(None, help=H("slides")),
    classes: int = typer.Option(None, help=H("classes")),
    size: int = typer.Option(None, help=H("size")),
    mpp: str = typer.Option(None, help=H("mpp") + " (comma-separated, e.g. 0.25,0.5)"),
    imbalance: float = typer.Option(None, help=H("imbalance")),
    max_slides_per_patient: int = typer.Option(None, help=H("max_slides_per_patient")),
    sites: int = typer.Option(None, help=H("sites")),
    lesion_fraction: str = typer.Option(
        None, help=H("lesion_fraction") + " (comma-separated low,high, e.g. 0.05,0.12)"
    ),
    seed: int = typer.Option(None, help=H("seed")),
    quality: int = typer.Option(None, help=H("quality")),
    workers: int = typer.Option(None, "--workers", "-j", help=H("workers")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'synth' section."),
) -> None:
    """Write a synthetic cohort: pyramidal JPEG Aperio SVS slides with class-specific lesions,
    ground-truth masks (truth/) and cohort.csv (with --sites, a site column and sites.json)."""
    from slidemil.config import build
    from slidemil.synthetic import synth as run_synth

    options = dict(
        slides=slides,
        classes=classes,
        size=size,
        mpp=parse_floats(mpp),
        imbalance=imbalance,
        max_slides_per_patient=max_slides_per_patient,
        sites=sites,
        lesion_fraction=_pair(parse_floats(lesion_fraction)),
        seed=seed,
        quality=quality,
        workers=workers,
        quiet=quiet,
    )
    resolved = build(SynthConfig, section="synth", config_file=config, overrides=options)
    cohort = run_synth(out, resolved)
    in_sites = f" in {resolved.sites} sites" if resolved.sites else ""
    typer.echo(
        f"{len(cohort)} slides, {len(cohort.class_names)} classes{in_sites} -> {out / 'cohort.csv'}"
    )


def _pair(values: list[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(values)
