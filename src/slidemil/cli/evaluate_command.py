"""``slidemil evaluate``: metrics of a training run with confidence intervals, calibration,
patient-level results and an external cohort, with plots."""

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
    level: str = typer.Option(None, "--level", help=H("level") + " (slide|patient|both)"),
    patient_aggregation: str = typer.Option(
        None, "--patient-aggregation", help=H("patient_aggregation") + " (mean|max)"
    ),
    external: Path = typer.Option(None, "--external", help=H("external")),
    bootstrap: int = typer.Option(None, "--bootstrap", help=H("bootstrap")),
    confidence: float = typer.Option(None, "--confidence", help=H("confidence")),
    seed: int = typer.Option(None, "--seed", help=H("seed")),
    ece_bins: int = typer.Option(None, "--ece-bins", help=H("ece_bins")),
    calibrate: str = typer.Option(None, "--calibrate", help=H("calibrate") + " (none|temperature)"),
    operating_point: str = typer.Option(
        None, "--operating-point", help=H("operating_point") + " (argmax|youden|sensitivity)"
    ),
    target_sensitivity: float = typer.Option(
        None, "--target-sensitivity", help=H("target_sensitivity")
    ),
    out: Path = typer.Option(None, "--out", "-o", help=H("out")),
    plots: bool = typer.Option(None, "--plots/--no-plots", help=H("plots")),
    curve_metric: str = typer.Option(None, "--curve-metric", help=H("curve_metric")),
    quiet: bool = typer.Option(None, "--quiet/--table", help=H("quiet")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'evaluate' section."),
) -> None:
    """Evaluate a run: accuracy, balanced accuracy, macro F1, per-class recall and one-vs-rest
    AUC per fold, pooled and mean ± std with bootstrap 95% CIs over patients; ECE, Brier and
    reliability diagrams (optionally after temperature scaling); slide and patient level; an
    external cohort's predictions side by side; ROC, PR and confusion matrices, written to
    <run>/report/."""
    from slidemil.config import build
    from slidemil.evaluation import evaluate as run_evaluate

    options = dict(
        level=level, patient_aggregation=patient_aggregation, external=external,
        bootstrap=bootstrap, confidence=confidence, seed=seed, ece_bins=ece_bins,
        calibrate=calibrate, operating_point=operating_point,
        target_sensitivity=target_sensitivity, out=out, plots=plots, curve_metric=curve_metric,
        quiet=quiet,
    )  # fmt: skip
    resolved = build(EvaluateConfig, section="evaluate", config_file=config, overrides=options)
    report = run_evaluate(run_dir, resolved)
    missing = ", ".join(map(str, report.missing_folds)) or "none"
    typer.echo(f"{len(report.folds)} fold(s) evaluated, missing: {missing} -> {report.out_dir}")
    if report.temperatures:
        typer.echo(f"temperatures: fold_<k>/calibration.json ({len(report.temperatures)} folds)")
