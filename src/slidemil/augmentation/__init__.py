"""Image augmentations a pathologist accepts (flips, quarter turns, HED stain jitter, colour and
hue jitter, light blur), batched on any device, for the augmented views stored at extraction."""

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "AugmentSpec": "slidemil.augmentation.spec",
    "augment_spec": "slidemil.augmentation.spec",
    "OP_NAMES": "slidemil.augmentation.spec",
    "DEFAULT_OPS": "slidemil.augmentation.spec",
    "Augmenter": "slidemil.augmentation.views",
    "patch_keys": "slidemil.augmentation.views",
}

__all__ = list(_API)

__getattr__, __dir__ = lazy_exports(__name__, _API)
