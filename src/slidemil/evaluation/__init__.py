"""Evaluation of a training run: metrics per fold and mean ± std, report files and plots.

``compute_metrics`` (in :mod:`slidemil.evaluation.metrics`) is the one place metrics are
computed, by reports and by training alike. Names load on first use so that importing the
options (``EvaluateConfig``) for ``slidemil evaluate --help`` does not import scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'slidemil.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
