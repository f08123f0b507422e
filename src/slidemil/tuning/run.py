"""``sweep()``: search TrainConfig options with Optuna, scored on validation parts only.

Layout under ``out``::

    space.yaml         the resolved search space and fixed options (a rerun must match it)
    study.journal      the Optuna journal storage every process of the sweep shares
    dev/fold_<k>/      each outer fold's development cohort (no test slides) + linked features
    trials/<nnnn>/     one trial: config.yaml, heartbeat, fold_<k>/ (an ordinary run folder each)
    trials.csv         every trial: state, objective, its std over folds, seconds, parameters
    best.yaml          the best trial's train section: `slidemil train --config best.yaml`
    history.png, importances.png, slice.png

Processes started with the same arguments (one node or a SLURM array) share the journal and draw
trials until ``trials`` have completed or been pruned; a rerun continues. A trial whose process
died stays RUNNING in the journal until its heartbeat file is 3 heartbeats old; then the next
process to start or finish a trial marks it failed and queues its parameters again, and the retry
resumes the dead trial's run folders from their last checkpoints.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from slidemil import atomic
from slidemil.config import read_yaml
from slidemil.errors import ConfigError, SlidemilError
from slidemil.training.config import TrainConfig
from slidemil.tuning.report import trials_table, write_best, write_plots
from slidemil.tuning.space import SweepSpace, load_space
from slidemil.tuning.trial import HEARTBEAT, TRIAL_FOLDER_ATTR, run_trial, write_dev_folds

STUDY_NAME = "slidemil-sweep"
SPACE_RECORD = "space.yaml"
JOURNAL = "study.journal"
STALE_HEARTBEATS = 3
log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """The sweep folder, its trials table and the best trial (None before one completes)."""

    out: Path
    trials: pd.DataFrame
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None

    def line(self) -> str:
        states = self.trials["state"].value_counts().to_dict()
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        if self.best_value is None:
            return f"{counts or 'no trials'}; no completed trial yet -> {self.out}"
        return f"{counts}; best {self.best_value:.4f} with {self.best_params} -> {self.out}"


def sweep(
    work: str | Path,
    space: str | Path | dict[str, Any],
    out: str | Path,
    *,
    trials: int = 20,
    sampler: str | None = None,
    quiet: bool = False,
) -> SweepResult:
    """Search the options of ``space`` (a YAML file or dict, see ``tuning.space``) for
    ``work/features`` bags; ``trials`` completed or pruned trials in all (over every process).

    Each trial is scored on the validation part of every outer fold (the folds ``slidemil
    train`` makes with the fixed options), never on a test part: train ``best.yaml`` on the outer
    folds afterwards for the test metrics.
    """
    import optuna

    if trials < 1:
        raise ConfigError(None, f"trials must be >= 1, got {trials}")
    resolved = load_space(space)
    if sampler is not None:
        resolved = load_space({**resolved.model_dump(), "sampler": sampler})
    work, out = Path(work), Path(out)
    _record_space(out, work, resolved)
    base = TrainConfig(**resolved.fixed)
    dev_folds = _dev_folds(work, out, base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(out, resolved)
    _retry_stale_trials(study, out, resolved)

    def objective(trial: optuna.Trial) -> float:
        number = trial.user_attrs.get("resumes", trial.number)
        folder = out / "trials" / f"{number:04d}"
        trial.set_user_attr(TRIAL_FOLDER_ATTR, folder.name)
        config = TrainConfig(**resolved.fixed, **resolved.suggest(trial))
        try:
            return run_trial(
                trial, config, dev_folds, folder, resolved.prune_every, resolved.heartbeat_seconds
            )
        except SlidemilError as e:
            trial.set_user_attr("error", str(e))
            raise

    from tqdm.auto import tqdm

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=counted))
    bar = tqdm(total=trials, initial=min(done, trials), desc="sweep", unit="trial", disable=quiet)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1 if trial.state in counted else 0)
        _retry_stale_trials(study, out, resolved)
        _write_outputs(out, study, resolved)

    if done < trials:
        study.optimize(
            objective,
            n_trials=trials - done,
            catch=(SlidemilError,),
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted), after_trial],
        )
    bar.close()
    return _write_outputs(out, study, resolved)


def _record_space(out: Path, work: Path, space: SweepSpace) -> None:
    """Write ``space.yaml``, or refuse a sweep folder started with another space or work."""
    record = {"work": str(work.resolve()), "space": space.model_dump(mode="json")}
    path = out / SPACE_RECORD
    if path.is_file():
        saved = read_yaml(path)
        if saved != record:
            changed = sorted(
                k for k in record["space"] if saved.get("space", {}).get(k) != record["space"][k]
            )
            if saved.get("work") != record["work"]:
                changed.append("work")
            raise ConfigError(
                path,
                f"this sweep folder was started with another {', '.join(changed)}",
                "use the same space file and work folder, or a new --out folder",
            )
        return
    atomic.write_text(path, yaml.safe_dump(record, sort_keys=False))


def _dev_folds(work: Path, out: Path, base: TrainConfig):
    """The outer folds ``slidemil train`` makes with the fixed options, as development folders
    without their test slides."""
    from slidemil.training.run import _splits_for, load_train_data

    # bags are only probed here: the trials read them
    data = load_train_data(work, base.model_copy(update={"cache": False}), warn=False)
    splits = _splits_for(data, base, warn=False)
    return write_dev_folds(work, out, splits, data.encoder)


def _open_study(out: Path, space: SweepSpace) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = out / JOURNAL
    # an open() lock works on NFS and Lustre too, where several nodes share the sweep folder
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    storage = optuna.storages.JournalStorage(backend)
    # a process started later than the first continues the draws instead of repeating them
    existing = optuna.study.get_all_study_names(storage)
    offset = (
        len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) if existing else 0
    )
    seed = space.seed + offset
    if space.sampler == "grid":
        sampler = optuna.samplers.GridSampler(space.grid(out / SPACE_RECORD), seed=seed)
    elif space.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials)
        if space.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner,
        direction=space.direction(), load_if_exists=True,
    )  # fmt: skip


def _filesystem_now(out: Path) -> float:
    """The sweep folder's file-system clock (nodes' clocks may differ; its mtimes do not)."""
    probe = out / f".clock-{uuid.uuid4().hex[:8]}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _retry_stale_trials(study: Any, out: Path, space: SweepSpace) -> None:
    """Fail RUNNING trials whose process died (heartbeat too old) and queue their parameters;
    the retry reuses the dead trial's folder, whose run folders resume."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return
    now = _filesystem_now(out)
    grace = STALE_HEARTBEATS * space.heartbeat_seconds
    for trial in running:
        folder = trial.user_attrs.get(TRIAL_FOLDER_ATTR)
        beat = out / "trials" / str(folder) / HEARTBEAT
        if folder is None or not beat.is_file():
            started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
            stale = time.time() - started > grace
        else:
            stale = now - beat.stat().st_mtime > grace
        if not stale:
            continue
        try:
            study._storage.set_trial_user_attr(
                trial._trial_id, "error", "its process died; retried"
            )
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except UpdateFinishedTrialError:  # another process got there first
            continue
        resumes = int(folder) if folder is not None else trial.number
        study.enqueue_trial(trial.params, user_attrs={"resumes": resumes})
        log.warning("trial %d: its process died; queued again to resume", trial.number)


def _write_outputs(out: Path, study: Any, space: SweepSpace) -> SweepResult:
    import optuna

    table = trials_table(study, space)
    atomic.write_csv(out / "trials.csv", table)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best_value, best_params, best_path = None, {}, None
    if complete:
        best = study.best_trial
        best_value, best_params = float(best.value), dict(best.params)
        best_path = out / "best.yaml"
        write_best(best_path, space, best_params)
    write_plots(out, table, study, space)
    return SweepResult(out, table, best_value, best_params, best_path)
