"""``slidemil sweep``: hyperparameter search over TrainConfig options (Optuna)."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors


@app.command()
@friendly_errors
def sweep(
    work: Path = typer.Argument(..., help="Work folder with cohort.csv and features/<encoder>/."),
    space: Path = typer.Option(..., "--space", "-s", help="Search space YAML (see docs/sweep.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder (e.g. runs/sweep1)."),
    trials: int = typer.Option(
        20, "--trials", "-n", help="Completed or pruned trials in all, over every process."
    ),
    sampler: str = typer.Option(
        None, "--sampler", help="tpe, random or grid (default: the space file's, else tpe)."
    ),
    quiet: bool = typer.Option(False, "--quiet/--progress", help="No progress bar."),
) -> None:
    """Search training options with Optuna: each trial trains on the outer folds' training parts
    and is scored on their validation parts only (never a test part); weak trials are pruned.

    Start the same command in several processes or SLURM array tasks to share the search; rerun
    it to continue. Then train best.yaml: `slidemil train WORK --config OUT/best.yaml`."""
    from slidemil.encoders.weights import require

    require("optuna", "sweep", "slidemil sweep")
    from slidemil.tuning import sweep as run_sweep

    result = run_sweep(work, space, out, trials=trials, sampler=sampler, quiet=quiet)
    typer.echo(result.line())
    typer.echo(f"trials: {out / 'trials.csv'}")
    if result.best_config is not None:
        typer.echo(f"next:   slidemil train {work} --config {result.best_config} --out RUN")
