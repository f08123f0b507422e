"""Attention heat maps: rendering at true patch footprints, figures, galleries, viewer exports.

Names load on first use, so importing the options (``HeatmapConfig``) for ``--help`` does not
import OpenCV or matplotlib.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _API)
