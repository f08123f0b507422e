"""Stain normalisation of patches (Macenko, Reinhard): fitted once on a target image, applied
batched on any device before the encoder, and recorded as a JSON-able state so prediction can
apply the same normaliser to new slides."""

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "STAIN_METHODS": "slidemil.stain.normalizer",
    "StainNormalizer": "slidemil.stain.normalizer",
    "WeakStainSeparationWarning": "slidemil.stain.macenko",
    "fit_stain_normalizer": "slidemil.stain.normalizer",
    "read_target_image": "slidemil.stain.target",
}

__all__ = list(_API)

__getattr__, __dir__ = lazy_exports(__name__, _API)
