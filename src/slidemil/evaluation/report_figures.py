"""The figures of an evaluation report, one folder per cohort and level::

    <out>/                  internal cross-validation, slide level (and training_curves.png)
    <out>/patient/          internal, patient level
    <out>/external/         external cohort, slide level
    <out>/external/patient/ external cohort, patient level

each holding ``confusion_matrix.png``, ``roc.png``, ``pr.png``, ``reliability.png`` (overall)
and ``reliability_<class>.png`` (per class; with 2 classes the positive class only).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from slidemil.evaluation.config import CURVE_METRIC_PREFERENCE
from slidemil.evaluation.run_files import RunInfo

if TYPE_CHECKING:
    from slidemil.evaluation.report import EvaluationReport, PartResult

logger = logging.getLogger(__name__)


def figure_dir(out: Path, cohort: str, level: str) -> Path:
    """Where the figures of ``cohort`` (internal / external) at ``level`` go."""
    folder = out / "external" if cohort == "external" else out
    return folder / "patient" if level == "patient" else folder


def write_figures(report: EvaluationReport, run: RunInfo, curve_metric: str | None) -> None:
    """Write every figure of the report and add their paths to ``report.files``."""
    for level in report.levels:
        pooled = report.result("pooled", level)
        _part_figures(report, run, pooled, report.summed_confusion_at(level), None)
        for r in report.results:
            if r.cohort == "external" and r.level == level:
                _part_figures(report, run, r, r.metrics.confusion, pooled)
    _training_curves(report, run, curve_metric)


def _part_figures(report, run, result: PartResult, confusion, reference: PartResult | None):
    from slidemil.evaluation.calibration import confidence_curve, reliability_curve
    from slidemil.evaluation.metrics import precision_recall_curves, roc_curves
    from slidemil.evaluation.plots import (
        plot_confusion,
        plot_precision_recall,
        plot_reliability,
        plot_roc,
    )

    names = report.class_names
    folder = figure_dir(report.out_dir, result.cohort, result.level)
    what = (
        f"external cohort ({result.metrics.n} {result.level}s)"
        if result.cohort == "external"
        else f"folds {', '.join(map(str, report.folds))} pooled ({result.level} level)"
    )
    name = run.run_dir.name
    y_true, probs = result.y_true, result.probs(names)
    files = []

    thresholded = len(names) == 2 and report.config.operating_point != "argmax"
    rule = f"{report.config.operating_point} threshold" if thresholded else "arg-max"
    path = folder / "confusion_matrix.png"
    plot_confusion(path, confusion, names, title=f"{name}: {what}, {rule}")
    files.append(path)

    curves = roc_curves(y_true, probs, names)
    ref = roc_curves(reference.y_true, reference.probs(names), names) if reference else None
    path = folder / "roc.png"
    plot_roc(path, curves, title=f"{name}: ROC, {what}", reference=ref,
             reference_label="internal CV")  # fmt: skip
    files.append(path)
    path = folder / "pr.png"
    plot_precision_recall(path, precision_recall_curves(y_true, probs, names),
                          title=f"{name}: precision-recall, {what}")  # fmt: skip
    files.append(path)

    bins = report.config.ece_bins
    before = result.before_probs
    label = "model" if before is None else "after temperature scaling"
    overall = {label: confidence_curve(y_true, probs, bins)}
    if before is not None:
        overall["before temperature scaling"] = confidence_curve(y_true, before, bins)
    path = folder / "reliability.png"
    plot_reliability(path, overall, f"{name}: reliability, {what}",
                     "confidence (probability of the predicted class)")  # fmt: skip
    files.append(path)
    classes = [1] if len(names) == 2 else range(len(names))
    for c in classes:
        curves = {label: reliability_curve(y_true == c, probs[:, c], bins)}
        if before is not None:
            curves["before temperature scaling"] = reliability_curve(
                y_true == c, before[:, c], bins
            )
        path = folder / f"reliability_{_safe(names[c])}.png"
        plot_reliability(path, curves, f"{name}: reliability of {names[c]}, {what}",
                         f"predicted probability of {names[c]}")  # fmt: skip
        files.append(path)
    report.files += files


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _training_curves(report: EvaluationReport, run: RunInfo, curve_metric: str | None) -> None:
    from slidemil.evaluation.plots import plot_training_curves

    histories = {}
    for fold in run.expected_folds:  # a fold still training has curves too
        path = run.fold_dir(fold) / "history.csv"
        if path.is_file():
            try:
                histories[f"fold {fold}"] = pd.read_csv(path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
                logger.warning("%s: unreadable, left out of training_curves.png (%s)", path, e)
    if not histories:
        logger.warning("%s: no history.csv in any fold; no training_curves.png", run.run_dir)
        return
    metric = curve_metric or _default_curve_metric(histories.values())
    plot_training_curves(report.out_dir / "training_curves.png", histories, metric)
    report.files.append(report.out_dir / "training_curves.png")


def _default_curve_metric(histories: Iterable[pd.DataFrame]) -> str | None:
    columns = {c for h in histories for c in h.columns}
    for name in CURVE_METRIC_PREFERENCE:
        if name in columns:
            return name
    others = sorted(c for c in columns if c.startswith("val_") and c != "val_loss")
    return others[0] if others else None
