"""Temperature scaling of a run's folds: fit each fold's temperature on its validation
predictions, store it in ``fold_<k>/calibration.json``, and scale prediction tables with it.

The math is in :mod:`slidemil.evaluation.calibration`; the file in
:mod:`slidemil.evaluation.calibration_file`.
"""

from __future__ import annotations

import logging

import pandas as pd

from slidemil.evaluation.calibration import (
    TEMPERATURE_RANGE,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from slidemil.evaluation.calibration_file import write_calibration
from slidemil.evaluation.run_files import VALIDATION_FILE, RunInfo
from slidemil.formats.prediction_table import probability_columns

logger = logging.getLogger(__name__)


def calibrate_folds(run: RunInfo, validation: pd.DataFrame, bins: int) -> dict[int, float]:
    """Fit and write every fold's temperature from its rows of ``validation`` (its
    ``val_predictions.csv``, slide level); returns fold -> temperature."""
    columns = probability_columns(run.class_names)
    temperatures = {}
    for fold, part in validation.groupby("fold", sort=True):
        y_true = part["label_index"].to_numpy()
        probs = part[columns].to_numpy()
        temperature = fit_temperature(y_true, probs)
        if not TEMPERATURE_RANGE[0] * 1.01 < temperature < TEMPERATURE_RANGE[1] / 1.01:
            logger.warning(
                "%s fold %s: temperature %.3g is at the edge of the search range %s: the "
                "validation predictions are (nearly) separable or uninformative, so the "
                "likelihood has no interior optimum", run.run_dir, fold, temperature,
                TEMPERATURE_RANGE,
            )  # fmt: skip
        scaled = apply_temperature(probs, temperature)
        fit = {
            "fitted_on": VALIDATION_FILE,
            "n_validation": len(part),
            "ece_bins": bins,
            "validation_nll_before": negative_log_likelihood(y_true, probs),
            "validation_nll_after": negative_log_likelihood(y_true, scaled),
            "validation_ece_before": expected_calibration_error(y_true, probs, bins),
            "validation_ece_after": expected_calibration_error(y_true, scaled, bins),
        }
        path = write_calibration(run.fold_dir(int(fold)), temperature, fit)
        logger.info("%s: temperature %.3f fitted on %d validation slides", path, temperature,
                    len(part))  # fmt: skip
        temperatures[int(fold)] = temperature
    return temperatures


def scale_by_fold(
    frame: pd.DataFrame, temperatures: dict[int, float], class_names: tuple[str, ...]
) -> pd.DataFrame:
    """A copy of a prediction table with each row's probabilities scaled by its fold's
    temperature."""
    columns = probability_columns(class_names)
    scaled = frame.copy()
    for fold, temperature in temperatures.items():
        rows = (scaled["fold"] == fold).to_numpy()
        if rows.any():
            scaled.loc[rows, columns] = apply_temperature(
                scaled.loc[rows, columns].to_numpy(), temperature
            )
    return scaled
