"""The slide viewer: a predictions folder served to the browser, the whole slide at full
resolution with its attention over it (OpenSeadragon, tiles cut on the fly).

Names load on first use, so importing the options (``ViewerConfig``) for ``--help`` does not
import Starlette or OpenSlide.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "ViewerConfig": "slidemil.viewer.config",
    "ViewerServer": "slidemil.viewer.run",
    "view": "slidemil.viewer.run",
    "create_app": "slidemil.viewer.server",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
