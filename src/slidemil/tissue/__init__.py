"""Tissue: automatic segmentation of a slide's thumbnail, or the user's own masks."""

from slidemil.tissue.segmentation import (
    TissueMask,
    TissueParams,
    filter_contours,
    rasterize,
    saturation_threshold,
    segment_tissue,
    segmentation_level,
)
from slidemil.tissue.user_masks import load_user_mask

__all__ = [
    "TissueMask",
    "TissueParams",
    "filter_contours",
    "load_user_mask",
    "rasterize",
    "saturation_threshold",
    "segment_tissue",
    "segmentation_level",
]
