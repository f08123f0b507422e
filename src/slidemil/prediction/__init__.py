"""Prediction on new slides: a trained run's fold models -> class probabilities and attention.

``predict(run_dir, slides_csv, out)`` patches and encodes raw slides exactly as the run's
training slides were (or reads existing feature files), runs one fold's model or every fold's,
and writes ``predictions.csv`` and one attention file per slide for ``slidemil heatmap``.
Names load on first use, so importing the options (``PredictConfig``) for ``--help`` does not
import torch.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "PredictConfig": "slidemil.prediction.config",
    "PredictSummary": "slidemil.prediction.run",
    "predict": "slidemil.prediction.run",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
