"""DSMIL: dual-stream MIL (Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for
Whole Slide Image Classification with Self-supervised Contrastive Learning", CVPR 2021).

Each instance is projected to ``hidden_dim`` (Linear + ReLU + dropout, as in every model here,
since the encoder is frozen) and read by two streams:

- **instance stream** (max pooling): a linear instance classifier scores every instance for
  every class; per class the *critical instance* is the valid instance with the highest score,
  and that score is the stream's logit for the class.
- **bag stream** (distance-based attention): queries ``q_i = q(h_i)`` of size ``attention_dim``;
  the attention logit of instance i for class c is ``<q_i, q_crit(c)> / sqrt(attention_dim)``,
  softmax over the bag's instances gives per-class attention, the attention-weighted sum of the
  values ``v(h_i)`` gives one bag embedding per class (C, hidden_dim), and a Conv1d over the C
  class embeddings (C in-channels, C out-channels, kernel ``hidden_dim``) gives the bag logits.

The logits are the mean of the two streams' logits, the paper's combination of its two outputs.
The paper trains with the mean of the two streams' losses; here the training loop's one loss on
the combined logits trains both streams (each gets its share of the gradient), so class weights
and calibration apply to exactly what is predicted.

Outputs (model interface version 2): ``attention`` (B, N) is the per-class attention of the
predicted class (the class whose logit is highest): the map DSMIL's own heat maps show, it sums
to 1 over valid instances and is 0 on padding. ``scores`` (B, N) are that class's attention
logits, ``-inf`` on padding; they measure similarity to the bag's own critical instance, so they
rank instances within a slide more than across slides. ``class_scores`` gives all C of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slidemil.models.abmil import input_projection
from slidemil.models.attention import masked_softmax
from slidemil.models.registry import register_model


class DSMIL(nn.Module):
    """Dual-stream MIL: max-instance classifier plus attention to each class's critical instance."""

    uses_labels = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
        nonlinear: bool = True,
        passing_v: bool = False,
    ):
        super().__init__()
        self.attention_dim = attention_dim
        self.project = input_projection(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        if nonlinear:
            self.query: nn.Module = nn.Sequential(
                nn.Linear(hidden_dim, attention_dim),
                nn.ReLU(),
                nn.Linear(attention_dim, attention_dim),
                nn.Tanh(),
            )
        else:
            self.query = nn.Linear(hidden_dim, attention_dim)
        if passing_v:
            self.value: nn.Module = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()
            )
        else:
            self.value = nn.Identity()
        # one filter per output class spanning all C class embeddings (the paper's "fcc")
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)

    def streams(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The two streams of ``features`` (B, N, D) under ``mask`` (B, N) bool.

        Returns ``max_logits`` (B, C) of the instance stream, ``bag_logits`` (B, C),
        ``class_scores`` (B, C, N) attention logits (``-inf`` on padding) and ``critical`` (B, C)
        the index of each class's critical instance (always a valid one when the bag has any).
        """
        instances = self.project(features)  # (B, N, H)
        instance_logits = self.instance_classifier(instances)  # (B, N, C)
        ranked = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = ranked.max(dim=1)  # (B, C) each
        # an all-padded bag has no critical instance: its stream logit is 0, not -inf
        max_logits = torch.nan_to_num(max_logits, neginf=0.0)
        queries = self.query(instances)  # (B, N, A)
        index = critical.unsqueeze(-1).expand(-1, -1, queries.shape[-1])  # (B, C, A)
        critical_queries = torch.gather(queries, 1, index)  # (B, C, A)
        similarity = torch.einsum("bna,bca->bcn", queries, critical_queries)
        class_scores = (similarity / math.sqrt(self.attention_dim)).masked_fill(
            ~mask.unsqueeze(1), float("-inf")
        )
        weights = masked_softmax(class_scores, mask.unsqueeze(1))  # (B, C, N)
        bags = torch.einsum("bcn,bnh->bch", weights, self.value(instances))  # (B, C, H)
        bag_logits = self.bag_classifier(bags).squeeze(-1)  # (B, C)
        return max_logits, bag_logits, class_scores, critical

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        return_scores: bool = False,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``features`` (B, N, D), ``mask`` (B, N) bool -> logits (B, C), attention (B, N)
        [, scores (B, N): the predicted class's attention logits, ``-inf`` on padding].

        ``labels`` is accepted for the common interface and unused (``uses_labels`` is False).
        """
        max_logits, bag_logits, class_scores, _ = self.streams(features, mask)
        logits = (max_logits + bag_logits) / 2
        predicted = logits.argmax(dim=-1)  # (B,)
        index = predicted[:, None, None].expand(-1, 1, class_scores.shape[-1])  # (B, 1, N)
        scores = torch.gather(class_scores, 1, index).squeeze(1)  # (B, N)
        weights = masked_softmax(scores, mask)
        if return_scores:
            return logits, weights, scores
        return logits, weights

    def class_scores(self, features: Tensor, mask: Tensor) -> Tensor:
        """Per-class attention logits (B, C, N) of ``features`` (B, N, D): instance i's
        similarity to class c's critical instance, ``-inf`` on padding."""
        return self.streams(features, mask)[2]


@register_model(
    "dsmil",
    "dual-stream MIL: max-instance classifier + attention to each class's critical instance "
    "(Li et al. 2021)",
)
def dsmil(
    in_dim: int,
    n_classes: int,
    hidden_dim: int = 256,
    attention_dim: int = 128,
    dropout: float = 0.25,
    nonlinear: bool = True,
    passing_v: bool = False,
) -> DSMIL:
    return DSMIL(in_dim, n_classes, hidden_dim, attention_dim, dropout, nonlinear, passing_v)
