"""``slidemil demo``: the whole pipeline on a synthetic cohort, in minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.demonstration import DemoConfig

H = DemoConfig.field_help


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Output folder."),
    slides: int = typer.Option(None, help=H("slides")),
    classes: int = typer.Option(None, help=H("classes")),
    size: int = typer.Option(None, help=H("size")),
    held_out: int = typer.Option(None, help=H("held_out")),
    folds: int = typer.Option(None, help=H("folds")),
    epochs: int = typer.Option(None, help=H("epochs")),
    encoder: str = typer.Option(None, help=H("encoder")),
    weights: str = typer.Option(None, help=H("weights")),
    mpp: float = typer.Option(None, help=H("mpp")),
    patch_size: int = typer.Option(None, help=H("patch_size")),
    workers: int = typer.Option(
        None, "--workers", "-j", help=H("workers") + " (default: all cores)"
    ),
    seed: int = typer.Option(None, help=H("seed")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'demo' section."),
) -> None:
    """Synthetic 8-class cohort -> patch -> extract -> train (k-fold) -> evaluate -> predict
    held-out slides -> heat maps; prints the balanced accuracy, how well attention finds the
    lesions, and where every output is."""
    from slidemil.config import build
    from slidemil.demonstration import demo as run_demo

    options = dict(
        slides=slides, classes=classes, size=size, held_out=held_out, folds=folds,
        epochs=epochs, encoder=encoder, weights=weights, mpp=mpp, patch_size=patch_size,
        workers=workers, seed=seed, quiet=quiet,
    )  # fmt: skip
    run_demo(out, build(DemoConfig, section="demo", config_file=config, overrides=options))
