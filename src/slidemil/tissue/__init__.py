"""Tissue: automatic segmentation of a slide's thumbnail, or the user's own masks.

Names load on first use: patching without masks never imports the mask-image readers.
"""

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "TissueMask": "slidemil.tissue.segmentation",
    "TissueParams": "slidemil.tissue.segmentation",
    "filter_contours": "slidemil.tissue.segmentation",
    "rasterize": "slidemil.tissue.segmentation",
    "saturation_threshold": "slidemil.tissue.segmentation",
    "segment_tissue": "slidemil.tissue.segmentation",
    "segmentation_level": "slidemil.tissue.segmentation",
    "load_user_mask": "slidemil.tissue.user_masks",
}

__all__ = list(_API)

__getattr__, __dir__ = lazy_exports(__name__, _API)
