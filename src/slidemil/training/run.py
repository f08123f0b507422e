"""``train()``: features + cohort -> one trained model per fold, with splits, checkpoints,
history, predictions and metrics under the run folder.

Layout::

    <out>/config.yaml   resolved options (a valid --config file)
    <out>/run.json      classes, folds, encoder, model, D, excluded slides, patch/extract options
    <out>/splits.csv    slide_id, patient_id, (site,) label, fold, part
    <out>/fold_<k>/     checkpoint_best.pt, checkpoint_latest.pt, history.csv, metrics.json,
                        predictions.csv (test part), val_predictions.csv

A fold whose ``metrics.json`` exists is finished and skipped; an unfinished fold resumes from its
``checkpoint_latest.pt`` and ends with the same weights as an uninterrupted run. A run folder
accepts only its own options and splits: rerunning it with other ones is refused, so finished and
resumed folds never mix two experiments.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from slidemil import __version__, atomic
from slidemil.config import build, read_yaml, write_resolved
from slidemil.errors import ConfigError
from slidemil.models import get_model_entry
from slidemil.training.config import SHARED_MODEL_OPTIONS, ZERO_MEANS_NONE, TrainConfig
from slidemil.training.data import TrainData, load_train_data
from slidemil.training.distributed import on_main, setup_distributed, teardown_distributed
from slidemil.training.fold import EpochBudget, train_fold
from slidemil.training.splits import make_splits

PATCH_CONFIG = "patch_config.yaml"
EXTRACT_CONFIG = "extract_config.yaml"


@dataclass
class TrainResult:
    """The run folder and, per fold handled here, its test metrics (the ``metrics.json`` dict;
    None: not finished because ``epoch_budget`` ran out, resume later). ``is_main`` is False on
    the other ranks under torchrun."""

    out: Path
    folds: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    is_main: bool = True

    @property
    def finished(self) -> bool:
        """Every fold handled here has its metrics."""
        return all(metrics is not None for metrics in self.folds.values())


def train(
    work: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    config_file: str | Path | None = None,
    **options: Any,
) -> TrainResult:
    """Train MIL models on ``work/features/<encoder>/`` bags labelled by ``work/cohort.csv``.

    A bag is ``<slide_id>.h5`` (slidemil, CLAM, TRIDENT) or ``<slide_id>.pt`` (CLAM); a folder
    of another tool's features is linked or copied in as ``work/features/<name>/`` (a CLAM
    ``--feat_dir`` is read from its ``h5_files/``, else its ``pt_files/``).

    Options are :class:`TrainConfig` fields (``train("work", "runs/exp1", folds=5)``); a YAML
    ``config_file``'s ``train`` section supplies defaults, and keyword options win over it (and
    over ``config``'s values). Under torchrun every rank calls this; only rank 0 writes.
    """
    config = _resolve_config(config, config_file, options)
    # fail before any work on an unknown model or option; record the options coerced
    entry = get_model_entry(config.model)
    config = config.model_copy(
        update={"model_options": entry.resolve_options(config.model_options)}
    )
    work, out = Path(work), Path(out)
    context = setup_distributed(config.device)
    finished = False
    try:
        data = load_train_data(work, config, warn=context.is_main)
        splits = _splits_for(data, config, warn=context.is_main)
        n_folds = int(splits["fold"].max()) + 1
        if config.fold is not None and config.fold >= n_folds:
            raise ConfigError(
                None,
                f"fold {config.fold} does not exist: the run has {n_folds} fold(s)",
                "the cohort's split column makes one fold" if n_folds == 1 else None,
            )
        on_main(context, lambda: _start_run(out, work, config, data, splits, n_folds))
        result = TrainResult(out, excluded=dict(data.excluded), is_main=context.is_main)
        budget = EpochBudget(config.epoch_budget)
        for fold in [config.fold] if config.fold is not None else range(n_folds):
            result.folds[fold] = train_fold(
                fold, splits[splits["fold"] == fold], data, config, out, context, budget
            )
        finished = True
        return result
    finally:
        teardown_distributed(context, finished=finished)


def _resolve_config(
    config: TrainConfig | None, config_file: str | Path | None, options: dict[str, Any]
) -> TrainConfig:
    if config is None:
        return build(TrainConfig, section="train", config_file=config_file, overrides=options)
    if config_file is not None:
        raise ConfigError(config_file, "give a TrainConfig or a config file, not both")
    if not options:
        return config
    base = config.model_dump()
    # build() reads None as "not given"; these options say "off" with 0 as well
    base.update({k: 0 for k in ZERO_MEANS_NONE if base[k] is None})
    # a shared option (hidden_dim, ...) now given in model_options replaces the config's value
    for key in SHARED_MODEL_OPTIONS:
        if key in (options.get("model_options") or {}) and key not in options:
            base.pop(key)
    return build(TrainConfig, section="train", overrides={**base, **options})


def _splits_for(data: TrainData, config: TrainConfig, *, warn: bool) -> pd.DataFrame:
    records = [r for r in data.cohort if r.slide_id in data.bags]
    frame = pd.DataFrame(
        {
            "slide_id": [r.slide_id for r in records],
            "patient_id": [r.patient_id for r in records],
            "label": [r.label for r in records],
            "split": [r.split for r in records],
        }
    )
    if data.cohort.has_sites:
        frame["site"] = [r.site for r in records]
    if warn and frame["split"].notna().any() and config.folds > 1 and not config.site_holdout:
        warnings.warn(
            f"{data.cohort.source}: the cohort's split column is used; --folds is ignored",
            UserWarning,
            stacklevel=3,
        )
    return make_splits(
        frame,
        folds=config.folds,
        fractions=config.split_fractions,
        val_fraction=config.val_fraction,
        seed=config.seed,
        source=None if data.cohort.source is None else str(data.cohort.source),
        site_holdout=config.site_holdout,
        warn=warn,
    )


def _start_run(
    out: Path,
    work: Path,
    config: TrainConfig,
    data: TrainData,
    splits: pd.DataFrame,
    n_folds: int,
) -> None:
    """Refuse a run folder started with other options or splits; write the run's files."""
    _check_same_run(out, config, splits)
    write_resolved(out / "config.yaml", {"train": config})
    entry = get_model_entry(config.model)
    features = work / "features" / data.encoder
    run = {
        "class_names": list(data.cohort.class_names),
        "folds": n_folds,
        "encoder": data.encoder,
        "model": config.model,
        "model_kwargs": config.model_kwargs(entry.defaults()),
        "feature_dim": data.feature_dim,
        "work": str(work.resolve()),
        "slidemil_version": __version__,
        "excluded_slides": data.excluded,
        # what `slidemil predict` needs to patch and encode new slides exactly like these
        "patch_config": _read_record(work / PATCH_CONFIG, section="patch"),
        "extract_config": _read_record(features / EXTRACT_CONFIG),
    }
    atomic.write_text(out / "run.json", json.dumps(run, indent=2))
    atomic.write_csv(out / "splits.csv", splits)


def _read_record(path: Path, *, section: str | None = None) -> dict[str, Any] | None:
    """A stage's resolved-options file (or one section of it); None when the file is absent."""
    if not path.is_file():
        return None
    data = read_yaml(path)
    return data if section is None else data.get(section)


def _check_same_run(out: Path, config: TrainConfig, splits: pd.DataFrame) -> None:
    fix = "use the same options and cohort, or a new --out folder"
    previous = out / "config.yaml"
    if previous.is_file():
        saved = read_yaml(previous).get("train") or {}
        now = config.result_options()
        changed = sorted(k for k in now if k in saved and saved[k] != now[k])
        if changed:
            shown = ", ".join(f"{k} ({saved[k]!r} -> {now[k]!r})" for k in changed)
            raise ConfigError(previous, f"this run folder was started with other {shown}", fix)
    saved_splits = out / "splits.csv"
    if saved_splits.is_file():
        before = pd.read_csv(saved_splits, dtype=str, keep_default_na=False)
        current = splits.astype(str)
        if "site" not in before.columns:  # a site column added to the cohort since changes no part
            current = current.drop(columns="site", errors="ignore")
        if list(before.columns) != list(current.columns) or not before.equals(current):
            raise ConfigError(
                saved_splits,
                "the splits differ from this run folder's (the cohort or the usable feature "
                "files changed)",
                fix,
            )
