"""``explain()``: per-class, per-instance scores of one bag for any registered MIL model.

    from slidemil import explain
    result = explain(model, features, method="ig")   # features (N, D): the model's input
    result.scores          # (C, N) float32, the model's class order
    result.class_specific  # False: the same scores for every class (a class-agnostic model)
    result.method          # "attention" or "ig"

``attention`` is the model's native explanation (:mod:`slidemil.explanation.native`); ``ig`` is
integrated gradients (:mod:`slidemil.explanation.integrated_gradients`), always class-specific.
Standardisation belongs to the model input: pass the features the model sees (a fold's
standardised features, as :class:`slidemil.prediction.ensemble.Ensemble` does), and the scores
are attributions with respect to those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from slidemil.explanation.integrated_gradients import (
    DEFAULT_BATCH_INSTANCES,
    DEFAULT_STEPS,
    IG_BASELINES,
    integrated_gradients,
)
from slidemil.explanation.native import native_scores
from slidemil.models.registry import model_uses_coords

ExplainMethod = Literal["attention", "ig"]
EXPLAIN_METHODS: tuple[str, ...] = ("attention", "ig")


@dataclass(frozen=True)
class ExplanationSettings:
    """How to explain: the method and, for ``ig``, its baseline, quadrature steps and the
    instances (steps × N) run per forward/backward pass (memory bound)."""

    method: str = "attention"
    baseline: str = "zero"
    steps: int = DEFAULT_STEPS
    batch_instances: int = DEFAULT_BATCH_INSTANCES

    def __post_init__(self) -> None:
        if self.method not in EXPLAIN_METHODS:
            raise ValueError(f"explanation method must be one of {', '.join(EXPLAIN_METHODS)}")
        if self.baseline not in IG_BASELINES:
            raise ValueError(f"IG baseline must be one of {', '.join(IG_BASELINES)}")
        if self.steps < 1 or self.batch_instances < 1:
            raise ValueError("IG steps and batch_instances must be at least 1")

    def record(self) -> dict[str, Any]:
        """What the scores depend on, for the attention file (``{}`` for native attention)."""
        if self.method != "ig":
            return {}
        return {"baseline": self.baseline, "steps": self.steps}


@dataclass(frozen=True)
class Explanation:
    """Per-class instance scores of one bag of N instances, C classes (the model's order)."""

    scores: np.ndarray  # (C, N) float32
    class_specific: bool  # False: every row is the same class-agnostic score
    method: str  # "attention" or "ig"
    logits: np.ndarray  # (C,) the bag's logits
    attention: np.ndarray  # (N,) the model's class-agnostic weights (forward's 2nd output)
    raw_scores: np.ndarray  # (N,) its class-agnostic scores before any softmax
    baseline_logits: np.ndarray | None = None  # (C,) ig only: the logits at the baseline
    settings: dict[str, Any] = field(default_factory=dict)  # ig: baseline, steps

    def completeness_gap(self) -> np.ndarray | None:
        """(C,) ig only: ``|Σ_i scores[c, i] − (logit_c(x) − logit_c(baseline))|``, the
        quadrature error of the attribution (``None`` for other methods)."""
        if self.baseline_logits is None:
            return None
        total = self.scores.astype(np.float64).sum(axis=1)
        return np.abs(total - (self.logits - self.baseline_logits)).astype(np.float32)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def explain(
    model: nn.Module,
    features: np.ndarray | Tensor,
    method: str = "attention",
    *,
    baseline: str = "zero",
    steps: int = DEFAULT_STEPS,
    batch_instances: int = DEFAULT_BATCH_INSTANCES,
    coords: np.ndarray | Tensor | None = None,
) -> Explanation:
    """Per-class scores of each instance of one bag ``features`` (N, D), any float dtype.

    ``features`` are the model's input (standardise them first where the model's fold does);
    they move to the model's device (CPU or CUDA). ``method="attention"``: the model's native
    scores (per class from ``class_scores`` where it has one, else its ``return_scores``
    scores, ``class_specific=False``). ``method="ig"``: integrated gradients of each class
    logit from ``baseline`` (``"zero"`` model input, or ``"mean"``: the bag's mean feature),
    a ``steps``-node Gauss–Legendre path integral run ``batch_instances // N`` steps per pass,
    each instance's attribution summed (signed) over its D features. The model runs in eval
    mode (its own mode is restored afterwards); nothing is learned. ``coords`` (N, 2), the
    instances' level-0 x, y, go to a model with ``uses_coords`` (every pass; integrated
    gradients keep them fixed along the path) and to no other.
    """
    settings = ExplanationSettings(method, baseline, steps, batch_instances)
    device = model_device(model)
    x = torch.as_tensor(features).detach().to(device=device, dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"explain takes one non-empty bag (N, D), got shape {tuple(x.shape)}")
    xy = None
    if coords is not None and model_uses_coords(model):
        xy = torch.as_tensor(coords).detach().to(device=device, dtype=torch.float32)
        if xy.shape != (x.shape[0], 2):
            raise ValueError(f"coords {tuple(xy.shape)} do not match the bag's {x.shape[0]} rows")
    was_training = model.training
    model.eval()
    # also when called under torch.inference_mode, whose tensors autograd cannot record
    with torch.inference_mode(False):
        if x.is_inference():
            x = x.clone()
        try:
            return _explain(model, x, settings, xy)
        finally:
            model.train(was_training)


def _explain(
    model: nn.Module, x: Tensor, settings: ExplanationSettings, coords: Tensor | None
) -> Explanation:
    native = native_scores(model, x, coords)
    common = {
        "logits": _numpy(native.logits),
        "attention": _numpy(native.attention),
        "raw_scores": _numpy(native.raw_scores),
    }
    if settings.method == "attention":
        scores = _numpy(native.class_scores)
        return Explanation(scores, native.class_specific, "attention", **common)
    attribution = integrated_gradients(
        model, x, baseline=settings.baseline, steps=settings.steps,
        batch_instances=settings.batch_instances, coords=coords,
    )  # fmt: skip
    return Explanation(
        _numpy(attribution.scores), True, "ig", **common,
        baseline_logits=_numpy(attribution.baseline_logits), settings=settings.record(),
    )  # fmt: skip


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().astype(np.float32)
