"""``slidemil predict``: a trained run + new slides (or features) -> predictions, attention."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors
from slidemil.prediction.config import PredictConfig

H = PredictConfig.field_help


@app.command()
@friendly_errors
def predict(
    run_dir: Path = typer.Argument(
        ...,
        help="Run folder written by `slidemil train --out`, or a `slidemil export` folder "
        "(or leave it out and give the export as --model DIR).",
    ),
    slides_csv: Path = typer.Argument(
        None, help="Cohort CSV of the slides: slide_id, path (+ label, patient_id, slide_mpp)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (e.g. preds/)."),
    model: str = typer.Option(
        None, "--model", "-m", help=H("model") + "; or a `slidemil export` folder"
    ),
    features: Path = typer.Option(None, "--features", help=H("features")),
    patches: Path = typer.Option(None, "--patches", help=H("patches")),
    patch_size_level0: float = typer.Option(
        None, "--patch-size-level0", help=H("patch_size_level0")
    ),
    step: int = typer.Option(None, "--step", help=H("step")),
    device: str = typer.Option(None, help=H("device")),
    batch_size: int = typer.Option(None, help=H("batch_size")),
    workers: int = typer.Option(None, "--workers", "-j", help=H("workers")),
    shard: str = typer.Option(None, help=H("shard")),
    calibrate: str = typer.Option(None, "--calibrate", help=H("calibrate") + " (none|temperature)"),
    explain: str = typer.Option(None, "--explain", help=H("explain") + " (attention|ig)"),
    ig_baseline: str = typer.Option(None, "--ig-baseline", help=H("ig_baseline")),
    ig_steps: int = typer.Option(None, "--ig-steps", help=H("ig_steps")),
    strict: bool = typer.Option(None, "--strict/--no-strict", help=H("strict")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    reader: str = typer.Option(None, help=H("reader")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'predict' section."),
) -> None:
    """Predict new slides with a trained run: patch and encode them with the options the run
    recorded (or read --features: slidemil, CLAM or TRIDENT bags; --patches or
    --patch-size-level0 place CLAM's for heat maps), then write predictions.csv (class
    probabilities, predicted class), attention/<slide_id>.h5 (attention and per-class patch
    scores by --explain attention|ig) and failures.csv under OUT. Rerun to resume."""
    from slidemil.prediction import predict as run_predict

    if slides_csv is None:
        # `slidemil predict --model model/ new.csv`: the export stands where the run would
        if model is None or not Path(model).is_dir():
            raise typer.BadParameter(
                "give RUN and SLIDES_CSV, or SLIDES_CSV with --model pointing at an export folder"
            )
        run_dir, slides_csv, model = Path(model), run_dir, None

    options = dict(
        model=model, features=features, patches=patches, patch_size_level0=patch_size_level0,
        step=step, device=device, batch_size=batch_size, workers=workers, shard=shard,
        strict=strict, quiet=quiet, calibrate=calibrate, reader=reader, explain=explain,
        ig_baseline=ig_baseline, ig_steps=ig_steps,
    )  # fmt: skip
    summary = run_predict(run_dir, slides_csv, out, config_file=config, **options)
    typer.echo(summary.line())
    typer.echo(f"predictions: {out / 'predictions.csv'}")
    typer.echo(f"attention:   {out / 'attention'}")
    if summary.failed:
        typer.echo(f"failures:    {out / 'failures.csv'}")
