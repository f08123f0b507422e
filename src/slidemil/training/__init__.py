"""Training MIL models on feature bags: ``train(work, out, **options)`` and its parts.

``TrainConfig`` lists every option; ``load_model_from_checkpoint`` rebuilds a trained model from
its checkpoint alone.
"""

from slidemil.training.checkpoint import load_checkpoint, load_model_from_checkpoint
from slidemil.training.config import TrainConfig
from slidemil.training.run import MissingBagsWarning, TrainResult, train

__all__ = [
    "MissingBagsWarning",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "train",
]
