"""A model's own per-instance scores, per class where it has them (model interface version 2).

A model with a ``class_scores(features, mask) -> (B, C, N)`` method (CLAM-MB's branch attention
logits, DSMIL's per-class attention) explains each class on its own. Any other model is
class-agnostic: its native explanation is the third output of ``forward(..., return_scores=True)``
(ABMIL's attention logits, mean-mil's zeros, max-mil's hidden-unit votes), the same for every
class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slidemil.models.registry import coords_keywords


@dataclass(frozen=True)
class NativeScores:
    """One forward pass over a bag of N instances and C classes (tensors on the model's device)."""

    logits: Tensor  # (C,)
    attention: Tensor  # (N,) class-agnostic weights, the forward's second output
    raw_scores: Tensor  # (N,) class-agnostic scores before any softmax (return_scores)
    class_scores: Tensor  # (C, N) per-class scores; raw_scores repeated when not class_specific
    class_specific: bool


def has_class_scores(model: nn.Module) -> bool:
    """True when ``model`` gives native per-class instance scores (a ``class_scores`` method)."""
    return callable(getattr(model, "class_scores", None))


def native_scores(model: nn.Module, features: Tensor, coords: Tensor | None = None) -> NativeScores:
    """The model's forward pass and native scores on one whole bag ``features`` (N, D) float32,
    on the model's device, with its ``coords`` (N, 2) for a model that uses them; no gradients
    are recorded."""
    mask = torch.ones(1, features.shape[0], dtype=torch.bool, device=features.device)
    extra = coords_keywords(model, None if coords is None else coords[None])
    with torch.no_grad():
        logits, attention, raw = model(features[None], mask, return_scores=True, **extra)[:3]
        logits, attention, raw = logits[0].float(), attention[0].float(), raw[0].float()
        if has_class_scores(model):
            per_class = model.class_scores(features[None], mask)[0].float()
            return NativeScores(logits, attention, raw, per_class, True)
    per_class = raw[None].expand(logits.shape[0], -1)
    return NativeScores(logits, attention, raw, per_class, False)
