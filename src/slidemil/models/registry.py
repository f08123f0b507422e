"""The MIL model registry: ``@register_model`` next to each definition, like timm's.

Every registered builder takes ``in_dim`` (feature size D) and ``n_classes`` plus its own keyword
arguments, and returns a module whose ``forward(features (B, N, D), mask (B, N) bool,
return_scores=False)`` gives ``(logits (B, C), attention (B, N))``, plus the raw attention scores
(B, N) (``-inf`` on padding) when ``return_scores`` is True. A checkpoint stores the name and the
keyword arguments, so :func:`build_model` rebuilds the same model with nothing else.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slidemil.errors import RegistryError

ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered MIL model: its name, builder and a one-line model card."""

    name: str
    builder: ModelBuilder
    description: str

    def defaults(self) -> dict[str, Any]:
        """The builder's keyword arguments with their default values."""
        signature = inspect.signature(self.builder)
        return {
            name: p.default
            for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty
        }


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a builder under ``name``; a duplicate name is an error."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise RegistryError(None, f"MIL model {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, builder, description)
        return builder

    return decorate


def get_model_entry(name: str) -> ModelEntry:
    """The entry for ``name``; an unknown name raises RegistryError listing the known ones."""
    try:
        return _MODELS[name]
    except KeyError:
        raise RegistryError(
            None, f"unknown MIL model {name!r}", f"choose one of {', '.join(sorted(_MODELS))}"
        ) from None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"abmil*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def build_model(name: str, *, in_dim: int, n_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for D = ``in_dim`` input features and ``n_classes``."""
    entry = get_model_entry(name)
    accepted = entry.defaults()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise RegistryError(
            None,
            f"MIL model {name!r} has no option(s) {', '.join(unknown)}",
            f"its options are {', '.join(sorted(accepted)) or 'none'}",
        )
    return entry.builder(in_dim=in_dim, n_classes=n_classes, **kwargs)
