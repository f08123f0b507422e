"""``slidemil train``: train MIL models on extracted features (torchrun for several GPUs)."""

from __future__ import annotations

from pathlib import Path

import typer

from slidemil.cli.app import app, friendly_errors, parse_floats
from slidemil.training.config import TrainConfig

H = TrainConfig.field_help


@app.command()
@friendly_errors
def train(
    work: Path = typer.Argument(..., help="Work folder with cohort.csv and features/<encoder>/."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (e.g. runs/exp1)."),
    model: str = typer.Option(None, help=H("model")),
    encoder: str = typer.Option(None, help=H("encoder")),
    hidden_dim: int = typer.Option(None, help=H("hidden_dim")),
    attention_dim: int = typer.Option(None, help=H("attention_dim")),
    dropout: float = typer.Option(None, help=H("dropout")),
    model_option: list[str] = typer.Option(
        None,
        "--model-option",
        help="KEY=VALUE: one of the model's own options (repeatable; e.g. --model-option k=8); "
        "added to the config file's model_options. See docs/models.md for each model's options.",
    ),
    folds: int = typer.Option(None, help=H("folds")),
    fold: int = typer.Option(None, help=H("fold")),
    split_fractions: str = typer.Option(
        None, help=H("split_fractions") + " (comma-separated, e.g. 0.7,0.15,0.15)"
    ),
    val_fraction: float = typer.Option(None, help=H("val_fraction")),
    site_holdout: bool = typer.Option(
        None, "--site-holdout/--no-site-holdout", help=H("site_holdout")
    ),
    epochs: int = typer.Option(None, help=H("epochs")),
    batch_size: int = typer.Option(None, help=H("batch_size")),
    max_patches: int = typer.Option(None, help=H("max_patches")),
    lr: float = typer.Option(None, help=H("lr")),
    weight_decay: float = typer.Option(None, help=H("weight_decay")),
    schedule: str = typer.Option(None, help=H("schedule")),
    warmup_epochs: int = typer.Option(None, help=H("warmup_epochs")),
    grad_clip: float = typer.Option(None, help=H("grad_clip")),
    class_weights: bool = typer.Option(
        None, "--class-weights/--no-class-weights", help=H("class_weights")
    ),
    sampler: str = typer.Option(None, help=H("sampler")),
    standardize: bool = typer.Option(None, "--standardize/--no-standardize", help=H("standardize")),
    views: str = typer.Option(None, help=H("views")),
    instance_dropout: float = typer.Option(None, help=H("instance_dropout")),
    feature_noise: float = typer.Option(None, help=H("feature_noise")),
    monitor: str = typer.Option(None, help=H("monitor")),
    patience: int = typer.Option(None, help=H("patience")),
    min_epochs: int = typer.Option(None, help=H("min_epochs")),
    smoothing: int = typer.Option(None, help=H("smoothing")),
    seed: int = typer.Option(None, help=H("seed")),
    device: str = typer.Option(None, help=H("device")),
    amp: bool = typer.Option(None, "--amp/--no-amp", help=H("amp")),
    cache: bool = typer.Option(None, "--cache/--no-cache", help=H("cache")),
    cache_limit_gb: float = typer.Option(None, help=H("cache_limit_gb")),
    workers: int = typer.Option(None, "--workers", "-j", help=H("workers")),
    epoch_budget: int = typer.Option(None, help=H("epoch_budget")),
    quiet: bool = typer.Option(None, "--quiet/--progress", help=H("quiet")),
    config: Path = typer.Option(None, "--config", help="YAML file; its 'train' section."),
) -> None:
    """Train attention-MIL models on feature bags: patient-level splits or K-fold CV, early
    stopping, checkpoints that resume a killed run, test predictions and metrics per fold.

    Rerun the same command to resume. Start it with torchrun for several GPUs or nodes."""
    from slidemil.config import build
    from slidemil.training import train as run_train

    fractions = parse_floats(split_fractions)
    options = dict(
        model=model, encoder=encoder, hidden_dim=hidden_dim, attention_dim=attention_dim,
        dropout=dropout, folds=folds, fold=fold,
        split_fractions=None if fractions is None else tuple(fractions),
        val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, max_patches=max_patches,
        lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
        grad_clip=grad_clip, class_weights=class_weights, sampler=sampler,
        standardize=standardize, monitor=monitor, patience=patience, min_epochs=min_epochs,
        smoothing=smoothing, seed=seed, device=device, amp=amp, cache=cache,
        cache_limit_gb=cache_limit_gb, workers=workers, epoch_budget=epoch_budget, quiet=quiet,
        site_holdout=site_holdout, views=views, instance_dropout=instance_dropout,
        feature_noise=feature_noise,
    )  # fmt: skip
    if model_option:
        options["model_options"] = {**_file_model_options(config), **_key_values(model_option)}
    resolved = build(TrainConfig, section="train", config_file=config, overrides=options)
    result = run_train(work, out, resolved)
    if not result.is_main:  # under torchrun, rank 0 speaks for the job
        return
    finished = [k for k, metrics in result.folds.items() if metrics is not None]
    if not result.finished:
        typer.echo(
            f"{len(finished)} of {len(result.folds)} fold(s) finished; stopped by --epoch-budget: "
            f"rerun the same command to resume -> {out}"
        )
    else:
        typer.echo(f"{len(finished)} fold(s) trained -> {out}")


def _key_values(items: list[str]) -> dict[str, str]:
    """``["k=8", "weight=0.3"]`` -> ``{"k": "8", "weight": "0.3"}`` (values coerced later to the
    type of each option's default)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--model-option")
        parsed[key.strip()] = value.strip()
    return parsed


def _file_model_options(config: Path | None) -> dict:
    """The config file's ``train.model_options`` (``--model-option`` adds to them)."""
    from slidemil.config import read_yaml

    if config is None:
        return {}
    section = read_yaml(config).get("train")
    options = section.get("model_options") if isinstance(section, dict) else None
    return dict(options) if isinstance(options, dict) else {}
