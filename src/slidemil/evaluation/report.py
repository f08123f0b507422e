"""``slidemil.evaluate``: read a training run (and optionally an external cohort's predictions),
compute every metric with bootstrap intervals, calibration and curves, write the report folder.

The orchestration only: metrics come from :mod:`slidemil.evaluation.metrics`, intervals from
:mod:`~slidemil.evaluation.bootstrap`, calibration from :mod:`~slidemil.evaluation.calibration`,
thresholds from :mod:`~slidemil.evaluation.operating_point`; the files and the terminal table are
written by :mod:`~slidemil.evaluation.report_tables` and :mod:`~slidemil.evaluation.plots`.

Each evaluated set is one *part*: a fold's test predictions, all folds' test predictions pooled
(out-of-fold), or the external cohort; at the slide level and, where patients have several
slides, at the patient level. See ``docs/evaluation.md`` for every file written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from slidemil.config import build, write_resolved
from slidemil.errors import ArtifactError
from slidemil.evaluation.config import EvaluateConfig
from slidemil.evaluation.run_files import (
    RunInfo,
    aggregate_patients,
    mixed_label_patients,
    read_external_predictions,
    read_fold_predictions,
    read_run,
    read_test_predictions,
    read_validation_predictions,
)
from slidemil.formats.prediction_table import PROB_PREFIX, probability_columns

if TYPE_CHECKING:
    from slidemil.evaluation.bootstrap import ConfidenceIntervals
    from slidemil.evaluation.metrics import ClassificationMetrics

__all__ = [
    "PROB_PREFIX",
    "EvaluationReport",
    "PartResult",
    "RunInfo",
    "aggregate_patients",
    "evaluate",
    "probability_columns",
    "read_fold_predictions",
    "read_run",
]

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
CONFIG_NAME = "evaluate_config.yaml"
INTERNAL, EXTERNAL = "internal", "external"
POOLED, ALL = "pooled", "all"  # the part names of the pooled folds and of the external cohort


@dataclass
class PartResult:
    """Everything measured on one part (a fold, the pooled folds, or the external cohort)."""

    cohort: str  # "internal" or "external"
    level: str  # "slide" or "patient"
    part: str  # fold number, "pooled" or "all"
    metrics: ClassificationMetrics  # at the chosen operating point
    intervals: ConfidenceIntervals | None  # bootstrap over patients; None with bootstrap=0
    ece: float  # top-label expected calibration error, equal-mass bins
    brier: float  # multi-class Brier score
    class_ece: np.ndarray  # (C,) one-vs-rest ECE
    threshold: float | None  # positive-class threshold (binary, non-arg-max operating point)
    before_calibration: tuple[float, float] | None  # (ECE, Brier) before temperature scaling
    before_probs: np.ndarray | None  # (N, C) probabilities before temperature scaling
    frame: pd.DataFrame  # the rows evaluated, with prob_<class> and predicted

    @property
    def y_true(self) -> np.ndarray:
        return self.frame["label_index"].to_numpy()

    def probs(self, class_names: tuple[str, ...]) -> np.ndarray:
        return self.frame[probability_columns(class_names)].to_numpy()


@dataclass
class EvaluationReport:
    """The result of :func:`evaluate`; the same tables are in the files under ``out_dir``."""

    run_dir: Path
    out_dir: Path
    levels: tuple[str, ...]
    class_names: tuple[str, ...]
    folds: tuple[int, ...]
    missing_folds: tuple[int, ...]
    results: list[PartResult]
    temperatures: dict[int, float]  # fold -> fitted temperature (calibrate='temperature')
    config: EvaluateConfig
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)  # metrics.csv
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)  # per_class.csv
    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)  # predictions.csv
    per_site: pd.DataFrame = field(default_factory=pd.DataFrame)  # per_site.csv (empty: no sites)
    files: list[Path] = field(default_factory=list)

    @property
    def level(self) -> str:
        """The first level reported (``slide`` unless only the patient level was asked for)."""
        return self.levels[0]

    def result(self, part: str | int, level: str | None = None, cohort: str = INTERNAL):
        """The :class:`PartResult` of ``part`` (a fold number, ``"pooled"``, or ``"all"`` for
        the external cohort) at ``level`` (default: :attr:`level`)."""
        level = level or self.level
        for r in self.results:
            if (r.cohort, r.level, r.part) == (cohort, level, str(part)):
                return r
        raise KeyError(f"no {cohort} {level}-level result for part {part!r}")

    def fold_results(self, level: str | None = None) -> list[PartResult]:
        level = level or self.level
        return [self.result(f, level) for f in self.folds]

    @property
    def fold_metrics(self) -> dict[int, ClassificationMetrics]:
        """Fold -> metrics of its test part, at :attr:`level`."""
        return {f: self.result(f).metrics for f in self.folds}

    @property
    def summed_confusion(self) -> np.ndarray:
        """The confusion matrix summed over folds, at :attr:`level`."""
        return self.summed_confusion_at(self.level)

    def summed_confusion_at(self, level: str) -> np.ndarray:
        """The folds' confusion matrices (at the operating point) summed, at ``level``."""
        return sum(r.metrics.confusion for r in self.fold_results(level))

    def mean_std(self, metric: str, level: str | None = None) -> tuple[float, float]:
        """``(mean, std)`` over folds of a ``metrics.csv`` column, e.g. ``"macro_auc"``."""
        level = level or self.level
        table = self.metrics[
            (self.metrics["cohort"] == INTERNAL) & (self.metrics["level"] == level)
        ]
        rows = table.set_index("fold")[metric]
        return float(rows["mean"]), float(rows["std"])


def evaluate(
    run_dir: str | Path,
    config: EvaluateConfig | None = None,
    *,
    config_file: str | Path | None = None,
    **options: Any,
) -> EvaluationReport:
    """Evaluate a training run: per fold, pooled and mean ± std metrics with bootstrap
    confidence intervals, calibration, ROC/PR curves, slide and patient level, and an external
    cohort next to them; report files, plots and a terminal table.

    Options are :class:`EvaluateConfig` fields, e.g. ``evaluate("runs/exp1", level="patient",
    external="preds/")``; ``config_file`` is a YAML file whose ``evaluate`` section gives
    defaults. ``calibrate="temperature"`` also writes each fold's ``calibration.json``.
    """
    from slidemil.evaluation.report_tables import print_table, write_tables

    config = config or build(
        EvaluateConfig, section="evaluate", config_file=config_file, overrides=options
    )
    run = read_run(run_dir)
    out_dir = Path(config.out) if config.out is not None else run.run_dir / REPORT_DIR
    names = run.class_names

    test, missing = read_test_predictions(run)
    folds = tuple(sorted(int(f) for f in test["fold"].unique()))
    if missing:
        logger.warning(
            "%s: fold(s) %s have no predictions.csv yet; reporting fold(s) %s",
            run.run_dir, ", ".join(map(str, missing)), ", ".join(map(str, folds)),
        )  # fmt: skip
    binary_threshold = len(names) == 2 and config.operating_point != "argmax"
    if config.operating_point != "argmax" and not binary_threshold:
        logger.warning(
            "%s: operating point %r applies to 2-class tasks only; using arg-max for %d classes",
            run.run_dir, config.operating_point, len(names),
        )  # fmt: skip
    validation = None
    if config.calibrate == "temperature" or binary_threshold:
        why = "temperature scaling" if config.calibrate == "temperature" else "the threshold"
        validation = read_validation_predictions(run, folds, why)

    uncalibrated = test
    temperatures: dict[int, float] = {}
    if config.calibrate == "temperature":
        from slidemil.evaluation.temperature import calibrate_folds, scale_by_fold

        temperatures = calibrate_folds(run, validation, config.ece_bins)
        test = scale_by_fold(test, temperatures, names)
        validation = scale_by_fold(validation, temperatures, names)

    external = None
    if config.external is not None:
        external = read_external_predictions(config.external, names)
        _check_external_calibration(external, config)

    results: list[PartResult] = []
    levels = _levels(config, test, run)
    for level in levels:
        results += _evaluate_level(
            level, run, config, test, uncalibrated, validation, external, binary_threshold
        )

    report = EvaluationReport(
        run_dir=run.run_dir,
        out_dir=out_dir,
        levels=levels,
        class_names=names,
        folds=folds,
        missing_folds=missing,
        results=results,
        temperatures=temperatures,
        config=config,
    )
    write_tables(report, run)
    write_resolved(out_dir / CONFIG_NAME, {"evaluate": config})
    report.files.append(out_dir / CONFIG_NAME)
    if config.plots:
        from slidemil.evaluation.report_figures import write_figures

        write_figures(report, run, config.curve_metric)
    if not config.quiet:
        print_table(report)
    return report


def _levels(config: EvaluateConfig, test: pd.DataFrame, run: RunInfo) -> tuple[str, ...]:
    if config.level != "both":
        return (config.level,)
    if not test.duplicated(["fold", "patient_id"]).any():
        logger.info("%s: every patient has one slide; patient level = slide level", run.run_dir)
        return ("slide",)
    mixed = mixed_label_patients(test)
    if mixed:
        logger.warning(
            "%s: patient(s) %s have slides with different labels; slide level only",
            run.run_dir, ", ".join(mixed[:5]),
        )  # fmt: skip
        return ("slide",)
    return ("slide", "patient")


def _check_external_calibration(external: pd.DataFrame, config: EvaluateConfig) -> None:
    states = set(external["calibration"])
    wanted = "temperature" if config.calibrate == "temperature" else "none"
    if states != {wanted}:
        logger.warning(
            "%s: external predictions are %s but the cross-validation is evaluated with "
            "calibrate=%s; use the same setting in `slidemil predict --calibrate`",
            config.external, "/".join(sorted(states)), config.calibrate,
        )  # fmt: skip


def _evaluate_level(
    level: str,
    run: RunInfo,
    config: EvaluateConfig,
    test: pd.DataFrame,
    uncalibrated: pd.DataFrame,
    validation: pd.DataFrame | None,
    external: pd.DataFrame | None,
    binary_threshold: bool,
) -> list[PartResult]:
    names = run.class_names

    def at_level(frame: pd.DataFrame | None) -> pd.DataFrame | None:
        if frame is None or level == "slide":
            return frame
        return aggregate_patients(frame, names, run.run_dir, config.patient_aggregation)

    test_l, raw_l, val_l = at_level(test), at_level(uncalibrated), at_level(validation)
    calibrated = config.calibrate == "temperature"
    thresholds: dict[int, float] = {}
    if binary_threshold:
        thresholds = _fold_thresholds(val_l, names, config, run)

    results, pooled_parts, pooled_before = [], [], []
    for fold in sorted(int(f) for f in test_l["fold"].unique()):
        part = test_l[test_l["fold"] == fold].reset_index(drop=True)
        before = raw_l[raw_l["fold"] == fold].reset_index(drop=True) if calibrated else None
        result = _assess(
            part, names, config, (INTERNAL, level, str(fold)), thresholds.get(fold), before
        )
        results.append(result)
        pooled_parts.append(result.frame)
        pooled_before.append(before)
    pooled = pd.concat(pooled_parts, ignore_index=True)
    before = pd.concat(pooled_before, ignore_index=True) if calibrated else None
    # each pooled row keeps its own fold's decision (threshold chosen on that fold's validation)
    key = (INTERNAL, level, POOLED)
    y_pred = pooled["predicted_index"].to_numpy()
    results.append(_assess(pooled, names, config, key, None, before, y_pred=y_pred))
    external_l = external
    if external is not None and level == "patient":
        mixed = mixed_label_patients(external)
        if mixed:
            logger.warning(
                "%s: patient(s) %s have slides with different labels; external cohort at "
                "slide level only", config.external, ", ".join(mixed[:5]),
            )  # fmt: skip
            external_l = None
        else:
            external_l = aggregate_patients(
                external, names, Path(config.external), config.patient_aggregation
            )
    if external_l is not None:
        # the external cohort is scored by the fold ensemble: the folds' mean threshold
        threshold = float(np.mean(list(thresholds.values()))) if thresholds else None
        results.append(_assess(external_l, names, config, (EXTERNAL, level, ALL), threshold, None))
    return results


def _fold_thresholds(
    validation: pd.DataFrame, names: tuple[str, ...], config: EvaluateConfig, run: RunInfo
) -> dict[int, float]:
    from slidemil.evaluation.operating_point import choose_threshold

    thresholds = {}
    for fold, part in validation.groupby("fold", sort=True):
        try:
            thresholds[int(fold)] = choose_threshold(
                part["label_index"].to_numpy() == 1,
                part[f"{PROB_PREFIX}{names[1]}"].to_numpy(),
                config.operating_point,
                config.target_sensitivity,
            )
        except ValueError as e:
            raise ArtifactError(
                run.fold_dir(int(fold)) / "val_predictions.csv",
                f"cannot choose the {config.operating_point} threshold: {e}",
                "use --operating-point argmax",
            ) from e
    return thresholds


def _assess(
    frame: pd.DataFrame,
    names: tuple[str, ...],
    config: EvaluateConfig,
    key: tuple[str, str, str],
    threshold: float | None,
    before: pd.DataFrame | None,
    *,
    y_pred: np.ndarray | None = None,
) -> PartResult:
    from slidemil.evaluation.bootstrap import bootstrap_intervals
    from slidemil.evaluation.calibration import (
        brier_score,
        class_calibration_errors,
        expected_calibration_error,
    )
    from slidemil.evaluation.metrics import compute_metrics
    from slidemil.evaluation.operating_point import predict_at_threshold

    cohort, level, part = key
    y_true = frame["label_index"].to_numpy()
    probs = frame[probability_columns(names)].to_numpy()
    if y_pred is None:
        y_pred = (
            probs.argmax(axis=1) if threshold is None else predict_at_threshold(probs, threshold)
        )
    source = f"{cohort} {level} level, {'fold ' if part.isdigit() else ''}{part}"
    metrics = compute_metrics(y_true, probs, names, source=source, y_pred=y_pred)
    intervals = None
    if config.bootstrap:
        intervals = bootstrap_intervals(
            y_true, probs, names, frame["patient_id"].to_numpy(), y_pred=y_pred,
            resamples=config.bootstrap, confidence=config.confidence, seed=config.seed,
        )  # fmt: skip
    before_calibration = raw = None
    if before is not None:
        raw = before[probability_columns(names)].to_numpy()
        before_calibration = (
            expected_calibration_error(y_true, raw, config.ece_bins),
            brier_score(y_true, raw),
        )
    frame = frame.copy()
    frame["predicted_index"] = y_pred
    frame["predicted"] = [names[i] for i in y_pred]
    if threshold is not None:
        frame["threshold"] = threshold
    return PartResult(
        cohort=cohort,
        level=level,
        part=part,
        metrics=metrics,
        intervals=intervals,
        ece=expected_calibration_error(y_true, probs, config.ece_bins),
        brier=brier_score(y_true, probs),
        class_ece=class_calibration_errors(y_true, probs, config.ece_bins),
        threshold=threshold,
        before_calibration=before_calibration,
        before_probs=raw,
        frame=frame,
    )
