"""Training MIL models on feature bags: ``train(work, out, **options)`` and its parts.

``TrainConfig`` lists every option; ``load_model_from_checkpoint`` rebuilds a trained model from
its checkpoint alone. Names load on first use, so that importing the options (``TrainConfig``)
for ``slidemil train --help`` does not import torch.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "MissingBagsWarning": "slidemil.training.data",
    "TrainConfig": "slidemil.training.config",
    "TrainResult": "slidemil.training.run",
    "load_checkpoint": "slidemil.training.checkpoint",
    "load_model_from_checkpoint": "slidemil.training.checkpoint",
    "train": "slidemil.training.run",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
