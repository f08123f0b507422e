"""Slide readers: one protocol, OpenSlide as reference and fallback, and a raw-tile reader.

``pick_reader(path, reader="auto")`` is the one place a file is opened; ``auto`` uses the tile
reader for Aperio SVS and generic tiled TIFF files whose tiles it decodes, OpenSlide otherwise.
:mod:`slidemil.readers.device_decode` decodes JPEG tiles in batches with
``torchvision.io.decode_jpeg`` (on the GPU when extracting on CUDA).
"""

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "SlideReader": "slidemil.readers.protocol",
    "OpenSlideReader": "slidemil.readers.openslide_reader",
    "TileReader": "slidemil.readers.tile_reader",
    "pick_reader": "slidemil.readers.choice",
    "READERS": "slidemil.readers.choice",
    "ReaderName": "slidemil.readers.protocol",
}

__all__ = list(_API)

__getattr__, __dir__ = lazy_exports(__name__, _API)
