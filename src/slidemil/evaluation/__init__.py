"""Evaluation of a training run: metrics per fold and mean ± std, report files and plots.

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
    "EvaluateConfig": "slidemil.evaluation.config",
    "EvaluationReport": "slidemil.evaluation.report",
    "evaluate": "slidemil.evaluation.report",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
