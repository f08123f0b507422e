"""The models of a run's folds, applied to one slide's bag: class probabilities, attention and
per-class instance scores.

Each fold's model gets its own input: the raw features standardised with the mean and std of that
fold's training split (folds of one run differ). Explanations (:func:`slidemil.explain`) are made
with respect to that standardised input, the features the model sees. Probabilities and per-class
scores are put in the run's class order whatever order a checkpoint stores, and the ensemble's
probabilities are the mean of the folds'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from slidemil.errors import ArtifactError
from slidemil.explanation.api import ExplanationSettings, explain
from slidemil.training.checkpoint import load_model_from_checkpoint


@dataclass
class FoldModel:
    """One fold's trained model, its standardisation and its output order."""

    name: str
    model: nn.Module
    mean: Tensor | None
    std: Tensor | None
    order: list[int]  # model output column of each run class
    temperature: float | None = None  # logits / T (fold_<k>/calibration.json); None: raw

    def model_input(self, bag: Tensor) -> Tensor:
        """A float32 copy of ``bag`` (N, D) standardised as this fold's training split was."""
        x = bag.to(torch.float32, copy=True)
        if self.mean is not None:
            x.sub_(self.mean).div_(self.std)
        return x


@dataclass
class SlideInference:
    """What the models said about one bag of N instances, F models, C classes."""

    probabilities: np.ndarray  # (F, C), run class order
    attention: np.ndarray  # (N, F) softmax attention, each column sums to 1
    scores: np.ndarray  # (N, F) raw pre-softmax attention scores
    # (N, F, C) each model's score of each instance for each class (run class order), made by
    # ``explanation``; None where the models give none (an exported graph)
    class_scores: np.ndarray | None = None
    class_specific: bool = False  # False: the scores are the same for every class
    explanation: str = "attention"  # the method: "attention" or "ig"

    @property
    def mean_probabilities(self) -> np.ndarray:
        """(C,) the ensemble's class probabilities: the mean over models."""
        return self.probabilities.mean(axis=0)


class Ensemble:
    """Fold models that score bags together (a single fold is an ensemble of one)."""

    def __init__(
        self,
        folds: list[FoldModel],
        device: torch.device,
        explanation: ExplanationSettings | None = None,
    ):
        self.folds = folds
        self.device = device
        self.explanation = explanation or ExplanationSettings()

    @property
    def names(self) -> list[str]:
        return [fold.name for fold in self.folds]

    @property
    def temperatures(self) -> dict[str, float | None]:
        """Fold name -> the temperature its logits are divided by (``None``: uncalibrated)."""
        return {fold.name: fold.temperature for fold in self.folds}

    @property
    def calibration(self) -> str:
        """``"temperature"`` when every fold's probabilities are temperature-scaled, else
        ``"none"`` (recorded with each prediction)."""
        calibrated = all(fold.temperature is not None for fold in self.folds)
        return "temperature" if calibrated else "none"

    @classmethod
    def load(
        cls,
        checkpoints: dict[str, Path],
        class_names: tuple[str, ...],
        feature_dim: int,
        device: torch.device,
        *,
        calibrate: bool = False,
        explanation: ExplanationSettings | None = None,
    ) -> Ensemble:
        """Load every checkpoint; refuse ones that disagree with the run on D or the classes.

        ``calibrate=True`` applies each fold's temperature from the ``calibration.json`` next
        to its checkpoint (an :class:`ArtifactError` if a fold has none or a stale one).
        ``explanation`` chooses how :meth:`infer` makes per-class scores (default: the models'
        native attention).
        """
        from slidemil.evaluation.calibration_file import load_temperature

        folds = []
        for name, path in checkpoints.items():
            model, state = load_model_from_checkpoint(path, device)
            stored = [str(c) for c in state["class_names"]]
            if sorted(stored) != sorted(class_names):
                raise ArtifactError(
                    path, f"classes {stored} differ from the run's {list(class_names)}"
                )
            if int(state["feature_dim"]) != feature_dim:
                raise ArtifactError(
                    path, f"takes {state['feature_dim']}-d features, the run {feature_dim}-d"
                )
            standardization = state.get("standardization")
            mean = std = None
            if standardization is not None:
                mean = torch.as_tensor(standardization["mean"], dtype=torch.float32).to(device)
                std = torch.as_tensor(standardization["std"], dtype=torch.float32).to(device)
            order = [stored.index(c) for c in class_names]
            temperature = load_temperature(path.parent) if calibrate else None
            folds.append(FoldModel(name, model.eval(), mean, std, order, temperature))
        return cls(folds, device, explanation)

    def infer(self, features: np.ndarray, coords: np.ndarray | None = None) -> SlideInference:
        """Every model on the whole bag ``features`` (N, D), any float dtype, with its patches'
        level-0 ``coords`` (N, 2) for the models that use them (None: the bag has none).

        The bag is moved to the device once in its stored dtype (float16 files stay half size);
        each model's standardised float32 copy is freed before the next model runs. Per-class
        scores come from :func:`slidemil.explain` with this ensemble's ``explanation``
        settings, on the standardised input; integrated gradients of the raw logits (before any
        temperature, which only rescales them).
        """
        settings = self.explanation
        probabilities, attention, scores, per_class, specific = [], [], [], [], []
        bag = torch.from_numpy(np.ascontiguousarray(features)).to(self.device)
        for fold in self.folds:
            with torch.no_grad():
                x = fold.model_input(bag)
            result = explain(
                fold.model, x, settings.method, baseline=settings.baseline,
                steps=settings.steps, batch_instances=settings.batch_instances, coords=coords,
            )  # fmt: skip
            del x
            temperature = 1.0 if fold.temperature is None else fold.temperature
            logits = torch.from_numpy(result.logits).double() / temperature
            probabilities.append(torch.softmax(logits, dim=-1).numpy()[fold.order])
            attention.append(result.attention)
            scores.append(result.raw_scores)
            per_class.append(result.scores[fold.order].T)  # (N, C), run class order
            specific.append(result.class_specific)
        return SlideInference(
            np.stack(probabilities).astype(np.float64),
            np.stack(attention, axis=1).astype(np.float32),
            np.stack(scores, axis=1).astype(np.float32),
            np.stack(per_class, axis=1).astype(np.float32),
            any(specific),
            settings.method,
        )
