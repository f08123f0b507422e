"""``slidemil patch``: tissue segmentation and patch coordinates for a cohort."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.patching.run import PatchConfig

H = PatchConfig.field_help


@app.command()
@friendly_errors
def patch(
    cohort_csv: Path = typer.Argument(..., help="cohort.csv: slide_id, path (+ mask_path, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Work folder for patches/ and previews/."),
    mpp: float = typer.Option(None, help=H("mpp")),
    magnification: float = typer.Option(None, help=H("magnification")),
    patch_size: int = typer.Option(None, help=H("patch_size")),
    step: int = typer.Option(None, help=H("step")),
    min_tissue: float = typer.Option(None, help=H("min_tissue")),
    slide_mpp: float = typer.Option(None, help=H("slide_mpp")),
    seg_mpp: float = typer.Option(None, help=H("seg_mpp")),
    seg_size: int = typer.Option(None, help=H("seg_size")),
    sthresh: int = typer.Option(None, help=H("sthresh")),
    sthresh_up: int = typer.Option(None, help=H("sthresh_up")),
    mthresh: int = typer.Option(None, help=H("mthresh")),
    close: int = typer.Option(None, help=H("close")),
    use_otsu: bool = typer.Option(None, "--use-otsu/--fixed-threshold", help=H("use_otsu")),
    min_tissue_area_um2: float = typer.Option(None, help=H("min_tissue_area_um2")),
    min_hole_area_um2: float = typer.Option(None, help=H("min_hole_area_um2")),
    max_n_holes: int = typer.Option(None, help=H("max_n_holes")),
    previews: bool = typer.Option(None, "--previews/--no-previews", help=H("previews")),
    workers: int = typer.Option(
        None, "--workers", "-j", help=H("workers") + " (default: all cores)"
    ),
    shard: str = typer.Option(None, help=H("shard")),
    overwrite: bool = typer.Option(None, "--overwrite", help=H("overwrite")),
    strict: bool = typer.Option(None, "--strict/--no-strict", help=H("strict")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    reader: str = typer.Option(None, help=H("reader")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'patch' section."),
) -> None:
    """Segment tissue and write patch coordinates (patches/<slide_id>.h5) and previews for
    every slide of COHORT_CSV."""
    from slidemil.patching import patch as run_patch

    options = dict(
        mpp=mpp, magnification=magnification, patch_size=patch_size, step=step,
        min_tissue=min_tissue, slide_mpp=slide_mpp, seg_mpp=seg_mpp, seg_size=seg_size,
        sthresh=sthresh,
        sthresh_up=sthresh_up, mthresh=mthresh, close=close, use_otsu=use_otsu,
        min_tissue_area_um2=min_tissue_area_um2, min_hole_area_um2=min_hole_area_um2,
        max_n_holes=max_n_holes, previews=previews, workers=workers, shard=shard,
        overwrite=overwrite, strict=strict, quiet=quiet, reader=reader,
    )  # fmt: skip
    summary = run_patch(cohort_csv, out, config_file=config, **options)
    typer.echo(summary.line())
    typer.echo(f"patch files: {out / 'patches'}")
    if summary.run.failed:
        typer.echo(f"failures:    {out / 'patches' / 'failures.csv'}")
    if (out / "previews").is_dir():
        typer.echo(f"previews:    {out / 'previews'}")
