"""Feature extraction: patch files + slides -> one HDF5 bag of patch features per slide."""

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "ExtractConfig": "slidemil.extraction.config",
    "extract": "slidemil.extraction.run",
}

__all__ = list(_API)

__getattr__, __dir__ = lazy_exports(__name__, _API)
