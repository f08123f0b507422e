"""MIL models: a registry of bag classifiers over patch features.

``build_model("abmil-gated", in_dim=1024, n_classes=3, hidden_dim=256)`` builds a model whose
``forward(features (B, N, D), mask (B, N) bool)`` returns ``(logits (B, C), attention (B, N))``,
and with ``return_scores=True`` also the raw pre-softmax attention scores (B, N).
``list_models()`` names them; add one with ``@register_model(name, description)`` next to its
definition (CLAM-SB and TransMIL fit as single entries).
"""

# Importing the definition modules registers their models.
from slidemil.models import abmil, clam, dsmil, pooling, transmil  # noqa: F401
from slidemil.models.registry import (
    ModelEntry,
    build_model,
    get_model_entry,
    list_models,
    register_model,
)

__all__ = ["ModelEntry", "build_model", "get_model_entry", "list_models", "register_model"]
