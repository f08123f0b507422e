"""Prediction on new slides: a trained run's fold models -> class probabilities and attention.

``predict(run_dir, slides_csv, out)`` patches and encodes raw slides exactly as the run's
training slides were (or reads existing feature files), runs one fold's model or every fold's,
and writes ``predictions.csv`` and one attention file per slide for ``slidemil heatmap``.
Names load on first use, so importing the options (``PredictConfig``) for ``--help`` does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_API = {
    "PredictConfig": "slidemil.prediction.config",
    "PredictSummary": "slidemil.prediction.run",
    "predict": "slidemil.prediction.run",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'slidemil.prediction' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
