"""The exported graph: one bag of raw features in, class probabilities and attention out.

``BagClassifier`` holds every exported fold's model with that fold's feature standardisation and
class order, so the graph needs nothing but the bag: ``features`` (N, D) float32 for any N ->
``probabilities`` (C,) (the mean of the folds', as ``slidemil predict`` averages them),
``attention`` (N, F) softmax weights per fold, ``fold_probabilities`` (F, C) and ``scores`` (N, F)
raw pre-softmax attention per fold. When a fold's model lays its instances out by their
coordinates (``uses_coords``, TransMIL), the graph takes a second input ``coords`` (N, 2)
float32, the patches' level-0 x, y in the rows of ``features``. It repeats
``prediction.ensemble.Ensemble.infer`` op for op, so exported and run-folder predictions agree
to float32 rounding.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from slidemil.models.registry import coords_keywords, model_uses_coords
from slidemil.prediction.ensemble import FoldModel

INPUT_NAME = "features"
COORDS_NAME = "coords"  # the second input of a graph whose models use coordinates
OUTPUT_NAMES = ("probabilities", "attention", "fold_probabilities", "scores")


class StandardizedFold(nn.Module):
    """One fold: standardise with its training mean/std, run the model, scale the logits by its
    calibration temperature, reorder the classes."""

    def __init__(self, fold: FoldModel, feature_dim: int):
        super().__init__()
        self.model = fold.model
        # A fold trained without standardisation gets the identity (mean 0, std 1).
        mean = torch.zeros(feature_dim) if fold.mean is None else fold.mean.detach().cpu()
        std = torch.ones(feature_dim) if fold.std is None else fold.std.detach().cpu()
        self.register_buffer("mean", mean.to(torch.float32).clone())
        self.register_buffer("std", std.to(torch.float32).clone())
        self.register_buffer("order", torch.tensor(fold.order, dtype=torch.long))
        # logits / T: the fold's temperature calibration, when exported with one (else 1)
        temperature = 1.0 if fold.temperature is None else float(fold.temperature)
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(
        self, features: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``features`` (N, D) [, ``coords`` (N, 2)] -> probabilities (C,), attention (N,),
        scores (N,)."""
        x = (features - self.mean) / self.std
        mask = torch.ones_like(x[:, 0], dtype=torch.bool)[None]  # (1, N): no padding
        extra = coords_keywords(self.model, None if coords is None else coords[None])
        logits, weights, scores = self.model(x[None], mask, return_scores=True, **extra)
        scaled = logits.float() / self.temperature
        probabilities = torch.softmax(scaled, dim=-1)[0].index_select(0, self.order)
        return probabilities, weights[0].float(), scores[0].float()


class BagClassifier(nn.Module):
    """The folds of an export, applied to one bag; see the module docstring for the outputs."""

    def __init__(self, folds: list[FoldModel], feature_dim: int):
        super().__init__()
        self.folds = nn.ModuleList(StandardizedFold(f, feature_dim) for f in folds)
        self.uses_coords = any(model_uses_coords(f.model) for f in folds)

    def input_names(self) -> list[str]:
        """The graph's inputs: ``features``, and ``coords`` when a fold's model uses them."""
        return [INPUT_NAME, COORDS_NAME] if self.uses_coords else [INPUT_NAME]

    def forward(
        self, features: Tensor, coords: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``features`` (N, D) float32 [, ``coords`` (N, 2) float32] -> probabilities (C,),
        attention (N, F), fold_probabilities (F, C), scores (N, F)."""
        outputs = [fold(features, coords) for fold in self.folds]
        fold_probabilities = torch.stack([p for p, _, _ in outputs])
        attention = torch.stack([w for _, w, _ in outputs], dim=1)
        scores = torch.stack([s for _, _, s in outputs], dim=1)
        return fold_probabilities.mean(dim=0), attention, fold_probabilities, scores


@contextlib.contextmanager
def torchscript_warnings_silenced() -> Iterator[None]:
    """torch 2.14 marks every ``torch.jit`` entry point deprecated; TorchScript files still load
    in C++ (libtorch) and Python, which is what this format is for, so say it once in the docs
    instead of on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        yield
