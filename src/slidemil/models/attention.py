"""Attention pooling over the instances of a bag (Ilse et al. 2018, "Attention-based Deep
Multiple Instance Learning").

Two scorers map each instance embedding to one score: plain ``tanh`` attention,
``w^T tanh(V h)``, and gated attention, ``w^T (tanh(V h) ⊙ sigmoid(U h))``. Scores of padded
positions are set to ``-inf`` before the softmax so padding never takes weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax of ``scores`` (B, N) over the valid instances given by ``mask`` (B, N) bool.

    Padded positions get exactly 0; a bag with no valid instance gets all zeros, not NaN.
    """
    filled = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(filled.float(), dim=-1)
    # an all-padded row is all -inf, whose softmax is NaN
    return torch.nan_to_num(weights, nan=0.0).to(scores.dtype)


class TanhAttention(nn.Module):
    """Instance scores ``w^T tanh(V h)``: (B, N, in_dim) -> (B, N)."""

    def __init__(self, in_dim: int, attention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.score = nn.Sequential(
            nn.Linear(in_dim, attention_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(attention_dim, 1),
        )

    def forward(self, instances: Tensor) -> Tensor:
        return self.score(instances).squeeze(-1)


class GatedAttention(nn.Module):
    """Instance scores ``w^T (tanh(V h) ⊙ sigmoid(U h))``: (B, N, in_dim) -> (B, N)."""

    def __init__(self, in_dim: int, attention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.content = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Linear(attention_dim, 1)

    def forward(self, instances: Tensor) -> Tensor:
        gated = self.dropout(self.content(instances) * self.gate(instances))
        return self.weight(gated).squeeze(-1)


def attention_pool(instances: Tensor, weights: Tensor) -> Tensor:
    """The weighted sum of ``instances`` (B, N, H) with ``weights`` (B, N): (B, H)."""
    return torch.einsum("bn,bnh->bh", weights, instances)
