"""``EvaluateConfig``: the options of ``slidemil evaluate`` (the ``evaluate`` section of a YAML
config). Kept apart from the report code so ``--help`` imports neither pandas nor scikit-learn."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from slidemil.config import StageConfig

# Validation metric drawn in training_curves.png when none is asked for: the first one present.
CURVE_METRIC_PREFERENCE = (
    "val_balanced_accuracy",
    "val_macro_auc",
    "val_auc",
    "val_accuracy",
    "val_macro_f1",
)


class EvaluateConfig(StageConfig):
    level: Literal["slide", "patient", "both"] = Field(
        "both",
        description="evaluate per slide, per patient (slide probabilities aggregated per "
        "patient), or both side by side (patient level only when some patient has several "
        "slides)",
    )
    patient_aggregation: Literal["mean", "max"] = Field(
        "mean",
        description="a patient's probabilities: the mean of its slides', or (2 classes) the "
        "max of the positive class ('any slide positive')",
    )
    external: Path | None = Field(
        None,
        description="predictions.csv (or its folder) written by `slidemil predict` for a "
        "labelled external cohort, evaluated next to the cross-validation",
    )
    bootstrap: int = Field(
        1000, ge=0, description="bootstrap resamples of patients for the confidence intervals "
        "(0: no intervals)"
    )  # fmt: skip
    confidence: float = Field(0.95, gt=0, lt=1, description="coverage of the intervals")
    seed: int = Field(0, description="seed of the bootstrap resamples")
    ece_bins: int = Field(
        10, ge=1, description="equal-mass bins of the expected calibration error and diagrams"
    )
    calibrate: Literal["none", "temperature"] = Field(
        "none",
        description="'temperature': fit a temperature per fold on its validation predictions, "
        "store it in fold_<k>/calibration.json and report calibrated probabilities (ECE before "
        "and after)",
    )
    operating_point: Literal["argmax", "youden", "sensitivity"] = Field(
        "argmax",
        description="decision rule of 2-class tasks: arg-max (0.5), or a threshold on the "
        "positive class chosen on each fold's validation predictions: 'youden' (max "
        "sensitivity + specificity) or 'sensitivity' (reach --target-sensitivity)",
    )
    target_sensitivity: float = Field(
        0.9, gt=0, le=1, description="sensitivity the 'sensitivity' operating point reaches"
    )
    out: Path | None = Field(None, description="report folder (default: <run>/report)")
    plots: bool = Field(True, description="write the PNG figures")
    curve_metric: str | None = Field(
        None,
        description="history.csv column drawn in training_curves.png (default: the first of "
        + ", ".join(CURVE_METRIC_PREFERENCE)
        + " present)",
    )
    quiet: bool = Field(False, description="do not print the table")
