"""Lazy public names: a package lists ``name -> module`` and each module loads on first use.

So ``import slidemil`` and ``slidemil --help`` stay instant while ``slidemil.train`` still works
(torch, OpenSlide and scikit-learn load only when a stage that needs them is used).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose names live in ``exports``."""

    def get_attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups no longer come here
        return value

    def list_names() -> list[str]:
        module = sys.modules[package]
        public = (n for n in vars(module) if not n.startswith("_"))
        return sorted({*exports, *getattr(module, "__all__", ()), *public})

    return get_attribute, list_names
