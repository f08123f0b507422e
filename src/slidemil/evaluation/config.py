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
    level: Literal["slide", "patient"] = Field(
        "slide",
        description="evaluate per slide, or per patient (mean of the patient's slide "
        "probabilities)",
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
