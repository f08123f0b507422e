"""Evaluation of a training run: metrics per fold, pooled and mean ± std with bootstrap
confidence intervals, calibration (ECE, Brier, temperature scaling), patient-level results,
external cohorts, report files and plots.

``compute_metrics`` (in :mod:`slidemil.evaluation.metrics`) is the one place metrics are
computed, by reports and by training alike. Names load on first use so that importing the
options (``EvaluateConfig``) for ``slidemil evaluate --help`` does not import scikit-learn.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "AbsentClassWarning": "slidemil.evaluation.metrics",
    "ClassificationMetrics": "slidemil.evaluation.metrics",
    "compute_metrics": "slidemil.evaluation.metrics",
    "roc_curves": "slidemil.evaluation.metrics",
    "precision_recall_curves": "slidemil.evaluation.metrics",
    "ConfidenceIntervals": "slidemil.evaluation.bootstrap",
    "bootstrap_intervals": "slidemil.evaluation.bootstrap",
    "apply_temperature": "slidemil.evaluation.calibration",
    "brier_score": "slidemil.evaluation.calibration",
    "expected_calibration_error": "slidemil.evaluation.calibration",
    "fit_temperature": "slidemil.evaluation.calibration",
    "reliability_curve": "slidemil.evaluation.calibration",
    "load_temperature": "slidemil.evaluation.calibration_file",
    "choose_threshold": "slidemil.evaluation.operating_point",
    "EvaluateConfig": "slidemil.evaluation.config",
    "EvaluationReport": "slidemil.evaluation.report",
    "PartResult": "slidemil.evaluation.report",
    "evaluate": "slidemil.evaluation.report",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
