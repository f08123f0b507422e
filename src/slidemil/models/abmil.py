"""Attention-based MIL (ABMIL): project instances, pool them by attention, classify the bag.

Shapes: ``features`` (B, N, D) float, ``mask`` (B, N) bool with True on real instances (False on
padding); returns ``logits`` (B, C) and ``attention`` (B, N), which sums to 1 over each bag's valid
instances and is 0 on padding. With ``return_scores=True`` the raw attention logits (B, N) before
the softmax come third (``-inf`` on padding): unlike the softmax weights they do not depend on
the bag's size, so they compare across slides.
"""

from __future__ import annotations

from torch import Tensor, nn

from slidemil.models.attention import (
    GatedAttention,
    TanhAttention,
    attention_pool,
    masked_softmax,
)
from slidemil.models.registry import register_model


def input_projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """Linear + ReLU + dropout from the encoder's D to the model's hidden size."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


def mlp_head(hidden_dim: int, n_classes: int, dropout: float) -> nn.Sequential:
    """The 2-layer bag classifier: Linear, ReLU, dropout, Linear to class logits."""
    return nn.Sequential(
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, n_classes),
    )


class ABMIL(nn.Module):
    """Attention MIL with tanh (``gated=False``) or gated tanh ⊙ sigmoid attention."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = False,
    ):
        super().__init__()
        self.project = input_projection(in_dim, hidden_dim, dropout)
        scorer = GatedAttention if gated else TanhAttention
        self.attention = scorer(hidden_dim, attention_dim)
        self.head = mlp_head(hidden_dim, n_classes, dropout)

    def forward(
        self, features: Tensor, mask: Tensor, return_scores: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``features`` (B, N, D), ``mask`` (B, N) bool -> logits (B, C), attention (B, N)
        [, scores (B, N): pre-softmax attention logits, ``-inf`` on padding]."""
        instances = self.project(features)  # (B, N, H)
        scores = self.attention(instances)  # (B, N)
        weights = masked_softmax(scores, mask)
        bag = attention_pool(instances, weights)  # (B, H)
        if return_scores:
            return self.head(bag), weights, scores.masked_fill(~mask, float("-inf"))
        return self.head(bag), weights


@register_model("abmil", "attention MIL, tanh attention (Ilse et al. 2018)")
def abmil(
    in_dim: int,
    n_classes: int,
    hidden_dim: int = 256,
    attention_dim: int = 128,
    dropout: float = 0.25,
) -> ABMIL:
    return ABMIL(in_dim, n_classes, hidden_dim, attention_dim, dropout, gated=False)


@register_model("abmil-gated", "attention MIL, gated tanh ⊙ sigmoid attention (Ilse et al. 2018)")
def abmil_gated(
    in_dim: int,
    n_classes: int,
    hidden_dim: int = 256,
    attention_dim: int = 128,
    dropout: float = 0.25,
) -> ABMIL:
    return ABMIL(in_dim, n_classes, hidden_dim, attention_dim, dropout, gated=True)
