"""Attention heat maps: rendering at true patch footprints, figures, galleries, viewer exports."""

from slidemil.heatmaps.localisation import localisation_auc, patch_mask_fraction
from slidemil.heatmaps.render import normalise_scores, rasterise, smooth
from slidemil.heatmaps.run import HeatmapConfig, heatmap

__all__ = [
    "HeatmapConfig",
    "heatmap",
    "localisation_auc",
    "normalise_scores",
    "patch_mask_fraction",
    "rasterise",
    "smooth",
]
