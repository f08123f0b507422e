"""Feature extraction: patch files + slides -> one HDF5 bag of patch features per slide."""

from slidemil.extraction.run import ExtractConfig, extract

__all__ = ["ExtractConfig", "extract"]
