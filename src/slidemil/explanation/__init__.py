"""One explanation for every MIL model: per-class, per-instance scores of a bag.

``explain(model, features (N, D), method="attention" | "ig")`` gives an :class:`Explanation`
whose ``scores`` are (C, N): how much each instance counts for each class. ``attention`` reads the
model's own scores (per class where the model has ``class_scores``, else its class-agnostic
``return_scores`` scores, flagged ``class_specific=False``); ``ig`` computes integrated gradients
of each class logit with respect to each instance's features, for any registered model. The
features are the model's input: standardised already where the fold standardises. Names load on
first use, so importing the package does not import torch.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "EXPLAIN_METHODS": "slidemil.explanation.api",
    "Explanation": "slidemil.explanation.api",
    "ExplanationSettings": "slidemil.explanation.api",
    "explain": "slidemil.explanation.api",
    "IG_BASELINES": "slidemil.explanation.integrated_gradients",
    "integrated_gradients": "slidemil.explanation.integrated_gradients",
    "native_scores": "slidemil.explanation.native",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
