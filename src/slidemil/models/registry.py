"""The MIL model registry: ``@register_model`` next to each definition, like timm's.

A registered builder takes ``in_dim`` (feature size D) and ``n_classes`` plus its own keyword
arguments with defaults, which are the model's options (:meth:`ModelEntry.defaults`; ``slidemil
train --model-option KEY=VALUE`` and YAML ``train: model_options:`` set them, checked and coerced
by :meth:`ModelEntry.resolve_options`). A checkpoint stores the name and the keyword arguments,
so :func:`build_model` rebuilds the same model with nothing else.

MIL model interface, version 2 (what every registered model's module provides):

- ``forward(features (B, N, D) float, mask (B, N) bool (True = real instance),
  return_scores: bool = False, labels: Tensor | None = None)`` returns ``(logits (B, C),
  attention (B, N))``: attention is the model's class-agnostic weight per instance (summing to 1
  over the valid instances where the model has a softmax; 0 on padding). With
  ``return_scores=True`` a third element ``scores`` (B, N): the raw native per-instance scores
  before any softmax, ``-inf`` on padding (they compare across slides; heat maps use them).
- Class attribute ``uses_labels: bool`` (absent = False). A model with ``uses_labels = True``
  (CLAM) is called in training as ``model(features, mask, labels=labels)`` (labels (B,) int64, in
  train mode) and then returns ``(logits, attention, auxiliary_loss)``, ``auxiliary_loss`` a scalar
  tensor already weighted by the model's own option; the training loss is
  ``BagLoss(logits, labels) + auxiliary_loss``. With ``labels=None`` it behaves like any other
  model (validation, prediction, export).
- Class attribute ``uses_coords: bool`` (absent = False). Such a model's ``forward`` takes an
  optional keyword ``coords: Tensor | None`` (B, N, 2), the level-0 x, y of the rows (float32 or
  int64; padding rows ignored), and lays the instances out by them (TransMIL's patch grid); with
  ``coords=None`` (bags without coordinates, such as CLAM's ``.pt``) it uses the instance order.
  Training, prediction, explanation and export pass the bag's coords to such a model
  (:func:`coords_keywords`) and never to any other.
- Optional method ``class_scores(features, mask) -> Tensor (B, C, N)``: native per-class instance
  scores (CLAM-MB's branches, DSMIL's per-class attention), ``-inf`` on padding. A model without
  it is class-agnostic: its native explanation is the ``scores`` of ``return_scores=True``.
- Padding never changes a bag's outputs: a bag alone and the same bag padded inside a batch give
  the same logits, attention and scores (to ~1e-5); N = 1 works; ``eval()`` is deterministic.
- It exports with ``slidemil export`` (ONNX with a dynamic N, and TorchScript) through
  ``model(x[None], mask, return_scores=True)`` (and ``coords=`` for a ``uses_coords`` model).

``tests/test_model_registry.py`` checks all of this for every registered entry.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from torch import Tensor, nn

from slidemil.errors import ConfigError, RegistryError

ModelBuilder = Callable[..., nn.Module]


def model_uses_coords(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DDP wrapper) takes ``coords=`` (class attribute
    ``uses_coords``; absent means False)."""
    return bool(getattr(getattr(model, "module", model), "uses_coords", False))


def coords_keywords(model: nn.Module, coords: Tensor | None) -> dict[str, Tensor]:
    """``{"coords": coords}`` for a model that uses coordinates and a bag that has them, else
    ``{}``: the keyword arguments to add to ``model(features, mask, ...)``."""
    return {"coords": coords} if coords is not None and model_uses_coords(model) else {}


@dataclass(frozen=True)
class ModelEntry:
    """A registered MIL model: its name, builder and a one-line model card."""

    name: str
    builder: ModelBuilder
    description: str

    def defaults(self) -> dict[str, Any]:
        """The builder's keyword arguments with their default values: the model's options."""
        signature = inspect.signature(self.builder)
        return {
            name: p.default
            for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` checked against the model's options and each value coerced to the type of
        its default (``"8"`` -> 8 for an int, ``"false"`` -> False for a bool, ``"none"`` ->
        None); an unknown key or a value of the wrong type raises ConfigError naming them."""
        defaults = self.defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ConfigError(
                None,
                f"MIL model {self.name!r} has no option(s) {', '.join(unknown)}",
                f"its options are {_listed(defaults)}",
            )
        return {
            key: _coerce(self.name, key, value, defaults[key]) for key, value in options.items()
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
            f"its options are {_listed(accepted)}",
        )
    return entry.builder(in_dim=in_dim, n_classes=n_classes, **kwargs)


def _listed(defaults: dict[str, Any]) -> str:
    return ", ".join(f"{k} (default {v!r})" for k, v in sorted(defaults.items())) or "none"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _coerce(model: str, key: str, value: Any, default: Any) -> Any:
    """``value`` (a command-line string or a YAML value) as the type of ``default``."""

    def refuse(expected: str) -> ConfigError:
        return ConfigError(
            None,
            f"MIL model {model!r} option {key}={value!r}: expected {expected} "
            f"(the default is {default!r})",
        )

    text = value.strip().lower() if isinstance(value, str) else None
    if isinstance(default, bool):  # before int: bool is an int subclass
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise refuse("true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        raise refuse("an integer")
    if isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:
            try:
                number = float(text)
            except ValueError:
                raise refuse("a number") from None
        else:
            raise refuse("a number")
        if not math.isfinite(number):
            raise refuse("a finite number")
        return number
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise refuse("a string")
    if default is None:  # no type to follow: a string is read as YAML ("8" -> 8, "none" -> None)
        if text in _NONE:
            return None
        return yaml.safe_load(value) if isinstance(value, str) else value
    parsed = yaml.safe_load(value) if isinstance(value, str) else value  # e.g. "[1, 2]"
    if isinstance(default, tuple) and isinstance(parsed, list):  # YAML has no tuples
        parsed = tuple(parsed)
    if isinstance(parsed, type(default)):
        return parsed
    raise refuse(f"a {type(default).__name__}")
