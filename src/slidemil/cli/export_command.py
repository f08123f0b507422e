"""``slidemil export``: a trained run -> a deployable ONNX or TorchScript graph + model card."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.deployment.config import ExportConfig

H = ExportConfig.field_help


@app.command()
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="Run folder written by `slidemil train --out`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (e.g. model/)."),
    graph_format: str = typer.Option(None, "--format", "-f", help=H("format")),
    fold: int = typer.Option(None, "--fold", help=H("fold")),
    opset: int = typer.Option(None, "--opset", help=H("opset")),
    calibrate: str = typer.Option(None, "--calibrate", help=H("calibrate")),
) -> None:
    """Export a trained run for deployment: one graph that takes a bag (N, D) of raw features and
    returns class probabilities and per-instance attention (every fold averaged, or --fold k),
    with model.json and MODEL_CARD.md. `slidemil predict OUT ...` then predicts without the run."""
    from slidemil.deployment import export as run_export

    summary = run_export(
        run_dir, out, format=graph_format, fold=fold, opset=opset, calibrate=calibrate
    )
    typer.echo(summary.line())
    typer.echo(f"model card: {out / 'MODEL_CARD.md'}")
