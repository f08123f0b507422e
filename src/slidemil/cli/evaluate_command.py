"""``slidemil evaluate``: per-fold and mean ± std metrics of a training run, with plots."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.evaluation.config import EvaluateConfig

H = EvaluateConfig.field_help


@app.command()
@friendly_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder written by `slidemil train --out`."),
    level: str = typer.Option(None, "--level", help=H("level") + " (slide|patient)"),
    out: Path = typer.Option(None, "--out", "-o", help=H("out")),
    plots: bool = typer.Option(None, "--plots/--no-plots", help=H("plots")),
    curve_metric: str = typer.Option(None, "--curve-metric", help=H("curve_metric")),
    quiet: bool = typer.Option(None, "--quiet/--table", help=H("quiet")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'evaluate' section."),
) -> None:
    """Evaluate a run: accuracy, balanced accuracy, macro F1, per-class recall, one-vs-rest AUC
    and confusion matrices per fold and mean ± std, written to <run>/report/ with plots."""
    from slidemil.config import build
    from slidemil.evaluation import evaluate as run_evaluate

    options = dict(level=level, out=out, plots=plots, curve_metric=curve_metric, quiet=quiet)
    resolved = build(EvaluateConfig, section="evaluate", config_file=config, overrides=options)
    report = run_evaluate(run_dir, resolved)
    missing = ", ".join(map(str, report.missing_folds)) or "none"
    typer.echo(f"{len(report.folds)} fold(s) evaluated, missing: {missing} -> {report.out_dir}")
