"""Integrated gradients of each class logit with respect to each instance's features.

For a bag ``x`` (N, D), a baseline bag ``b`` and class c (Sundararajan et al. 2017)::

    IG[c, i, d] = (x[i, d] - b[i, d]) * ∫₀¹ ∂ logit_c(b + α (x - b)) / ∂x[i, d] dα

The integral is a Gauss–Legendre quadrature on ``steps`` nodes of [0, 1] (exact for polynomials
of degree 2·steps − 1, so far closer than a Riemann sum of as many steps on smooth models). Each
instance's score is the signed sum over its D features, ``score[c, i] = Σ_d IG[c, i, d]``: positive
where the instance pushes class c's logit up from the baseline, negative where it pulls it down.
Completeness: ``Σ_i score[c, i] ≈ logit_c(x) − logit_c(b)``; the gap measures quadrature error.

Baselines: ``zero``, the all-zero model input (for a fold that standardises its features this is
the training split's mean feature, the "average patch"); ``mean``, every instance replaced by the
bag's own mean feature (attributions then say how each instance differs from the rest of its
slide). The interpolated bags are run ``max(1, batch_instances // N)`` steps at a time, so memory
stays bounded for any N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from slidemil.models.registry import coords_keywords

IgBaseline = Literal["zero", "mean"]
IG_BASELINES: tuple[str, ...] = ("zero", "mean")
DEFAULT_STEPS = 32
# instances (steps × N) in one forward/backward pass: ~256 MB of float32 input at D = 1024
DEFAULT_BATCH_INSTANCES = 65536


@dataclass(frozen=True)
class Attribution:
    """Integrated gradients of one bag: per-class instance scores and the logits they split."""

    scores: Tensor  # (C, N) signed sum over D of each instance's attribution
    logits: Tensor  # (C,) at the features
    baseline_logits: Tensor  # (C,) at the baseline


def baseline_bag(features: Tensor, baseline: str) -> Tensor:
    """The reference bag (N, D) that attributions are measured from (see the module docstring)."""
    if baseline == "zero":
        return torch.zeros_like(features)
    if baseline == "mean":
        return features.mean(dim=0, keepdim=True).expand_as(features)
    raise ValueError(f"IG baseline must be one of {', '.join(IG_BASELINES)}, not {baseline!r}")


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes α in (0, 1) and weights summing to 1, ``steps`` of each."""
    if steps < 1:
        raise ValueError(f"IG needs at least 1 step, got {steps}")
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


def integrated_gradients(
    model: nn.Module,
    features: Tensor,
    *,
    baseline: str = "zero",
    steps: int = DEFAULT_STEPS,
    batch_instances: int = DEFAULT_BATCH_INSTANCES,
    coords: Tensor | None = None,
) -> Attribution:
    """Integrated gradients of every class logit of ``model`` on one bag ``features`` (N, D)
    float32 (the model's input, on its device). The model should be in eval mode (dropout
    would make the path integral noisy); its parameters' gradients are left untouched.
    ``coords`` (N, 2), for a model that uses them, stay fixed along the path."""
    with torch.inference_mode(False):  # autograd cannot record inference tensors
        x = features.detach().float()
        x = x.clone() if x.is_inference() else x
        return _integrate(model, x, baseline, steps, batch_instances, coords)


def _integrate(
    model: nn.Module,
    x: Tensor,
    baseline: str,
    steps: int,
    batch_instances: int,
    coords: Tensor | None,
) -> Attribution:
    n = x.shape[0]
    one = coords_keywords(model, None if coords is None else coords[None])
    alphas, weights = quadrature(steps)
    with torch.no_grad():
        reference = baseline_bag(x, baseline).clone()
        delta = x - reference
        full = torch.ones(1, n, dtype=torch.bool, device=x.device)
        logits = model(x[None], full, **one)[0][0].float()
        baseline_logits = model(reference[None], full, **one)[0][0].float()
    n_classes = logits.shape[0]
    scores = torch.zeros(n_classes, n, dtype=torch.float32, device=x.device)
    per_pass = max(1, batch_instances // max(n, 1))
    for start in range(0, steps, per_pass):
        alpha = torch.as_tensor(alphas[start : start + per_pass], dtype=x.dtype, device=x.device)
        weight = torch.as_tensor(weights[start : start + per_pass], dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            path = (reference[None] + alpha[:, None, None] * delta[None]).requires_grad_(True)
            mask = torch.ones(path.shape[:2], dtype=torch.bool, device=x.device)
            # (S, C): each step is its own bag, all on the same coords
            on_path = coords_keywords(
                model, None if coords is None else coords[None].expand(len(alpha), -1, -1)
            )
            path_logits = model(path, mask, **on_path)[0].float()
            for c in range(n_classes):
                (gradient,) = torch.autograd.grad(
                    path_logits[:, c].sum(), path, retain_graph=c < n_classes - 1
                )
                # Σ_s w_s Σ_d δ[i, d] ∂logit_c/∂x[i, d] at step s: the (C, N) scores directly,
                # so the (C, N, D) attribution never sits in memory
                scores[c] += torch.einsum("snd,nd,s->n", gradient.float(), delta, weight)
        del path, path_logits
    return Attribution(scores, logits, baseline_logits)
