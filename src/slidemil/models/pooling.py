"""Baselines without learned attention: mean and max pooling of projected instances.

They return an "attention" too, so every model plugs into the same heatmap code: uniform weights
for mean pooling, and for max pooling the share of hidden units whose maximum each instance holds.
Their ``return_scores`` are zeros (mean) and the per-instance vote counts (max), ``-inf`` on
padding as for the attention models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slidemil.models.abmil import input_projection, mlp_head
from slidemil.models.registry import register_model


class MeanMIL(nn.Module):
    """Mean of the projected valid instances, then the MLP head."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25):
        super().__init__()
        self.project = input_projection(in_dim, hidden_dim, dropout)
        self.head = mlp_head(hidden_dim, n_classes, dropout)

    def forward(
        self, features: Tensor, mask: Tensor, return_scores: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``features`` (B, N, D), ``mask`` (B, N) bool -> logits (B, C), attention (B, N)
        [, scores (B, N): zeros, ``-inf`` on padding]."""
        instances = self.project(features)
        valid = mask.to(instances.dtype)
        weights = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
        bag = torch.einsum("bn,bnh->bh", weights, instances)
        if return_scores:
            return self.head(bag), weights, _pad_scores(torch.zeros_like(weights), mask)
        return self.head(bag), weights


class MaxMIL(nn.Module):
    """Element-wise maximum over the projected valid instances, then the MLP head."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25):
        super().__init__()
        self.project = input_projection(in_dim, hidden_dim, dropout)
        self.head = mlp_head(hidden_dim, n_classes, dropout)

    def forward(
        self, features: Tensor, mask: Tensor, return_scores: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``features`` (B, N, D), ``mask`` (B, N) bool -> logits (B, C), attention (B, N)
        [, scores (B, N): hidden units each instance wins, ``-inf`` on padding]."""
        instances = self.project(features)  # (B, N, H)
        filled = instances.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        bag, winner = filled.max(dim=1)  # (B, H), index of the winning instance per unit
        bag = torch.nan_to_num(bag, neginf=0.0)  # an empty bag pools to zeros
        votes = torch.zeros_like(mask, dtype=instances.dtype)
        votes.scatter_add_(1, winner, torch.ones_like(winner, dtype=instances.dtype))
        votes = votes * mask
        weights = votes / instances.shape[-1]
        if return_scores:
            return self.head(bag), weights, _pad_scores(votes, mask)
        return self.head(bag), weights


def _pad_scores(scores: Tensor, mask: Tensor) -> Tensor:
    return scores.masked_fill(~mask, float("-inf"))


@register_model("mean-mil", "baseline: mean pooling of projected instances")
def mean_mil(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25) -> MeanMIL:
    return MeanMIL(in_dim, n_classes, hidden_dim, dropout)


@register_model("max-mil", "baseline: max pooling of projected instances")
def max_mil(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25) -> MaxMIL:
    return MaxMIL(in_dim, n_classes, hidden_dim, dropout)
