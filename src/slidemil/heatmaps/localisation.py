"""How well attention finds annotated regions: per-patch overlap with a mask, and its AUC."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from slidemil.heatmaps.render import footprint_boxes


def patch_mask_fraction(
    coords: np.ndarray, patch_size_level0: float, mask: np.ndarray, mask_downsample: float
) -> np.ndarray:
    """(N,) fraction of each patch's footprint covered by a boolean ``mask`` at
    ``mask_downsample`` (level-0 px per mask px). Patches smaller than a mask pixel get the value
    of the pixel under their centre."""
    mask = np.asarray(mask, bool)
    boxes = footprint_boxes(coords, patch_size_level0, mask_downsample, mask.shape)
    integral = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    x0, y0, x1, y1 = boxes.T
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    centres = (np.asarray(coords, np.float64) + patch_size_level0 / 2) / mask_downsample
    cx = np.clip(centres[:, 0].astype(np.int64), 0, mask.shape[1] - 1)
    cy = np.clip(centres[:, 1].astype(np.int64), 0, mask.shape[0] - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(area > 0, inside / np.maximum(area, 1), mask[cy, cx])
    return fraction.astype(np.float32)


def localisation_auc(
    scores: np.ndarray, mask_fraction: np.ndarray, threshold: float = 0.5
) -> float:
    """ROC AUC of ``scores`` for telling patches inside the mask (fraction >= ``threshold``)
    from the rest; NaN when all patches fall on one side."""
    positive = np.asarray(mask_fraction) >= threshold
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores)))
