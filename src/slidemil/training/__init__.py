"""Training MIL models on feature bags: ``train(work, out, **options)`` and its parts.

``TrainConfig`` lists every option; ``load_model_from_checkpoint`` rebuilds a trained model from
its checkpoint alone. Names load on first use, so that importing the options (``TrainConfig``)
for ``slidemil train --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_API = {
    "MissingBagsWarning": "slidemil.training.run",
    "TrainConfig": "slidemil.training.config",
    "TrainResult": "slidemil.training.run",
    "load_checkpoint": "slidemil.training.checkpoint",
    "load_model_from_checkpoint": "slidemil.training.checkpoint",
    "train": "slidemil.training.run",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'slidemil.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
