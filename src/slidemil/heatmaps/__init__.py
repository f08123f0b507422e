"""Attention heat maps: rendering at true patch footprints, figures, galleries, viewer exports.

Names load on first use, so importing the options (``HeatmapConfig``) for ``--help`` does not
import OpenCV or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_API = {
    "HeatmapConfig": "slidemil.heatmaps.config",
    "heatmap": "slidemil.heatmaps.run",
    "localisation_auc": "slidemil.heatmaps.localisation",
    "patch_mask_fraction": "slidemil.heatmaps.localisation",
    "normalise_scores": "slidemil.heatmaps.render",
    "rasterise": "slidemil.heatmaps.render",
    "smooth": "slidemil.heatmaps.render",
    "heat_grid": "slidemil.heatmaps.export",
    "write_geojson": "slidemil.heatmaps.export",
    "write_heatmap_tiff": "slidemil.heatmaps.export",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'slidemil.heatmaps' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
