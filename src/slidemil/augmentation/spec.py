"""Which augmentations make the views of a patch, how strong they are, and from which seed.

Pure Python (no torch), so configs validate and ``--help`` stays instant. An
:class:`AugmentSpec` is what a feature file records as its ``augmentation`` attribute and what
decides whether a file's views are the ones asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AugmentOp:
    """One augmentation: its name, default strength (``None``: it has none) and allowed range."""

    name: str
    default: float | None
    low: float = 0.0
    high: float = 0.0
    meaning: str = ""


# In the order they are applied (geometric, stain, colour, then blur), whatever order is asked.
OPS: tuple[AugmentOp, ...] = (
    AugmentOp("flip", None, meaning="horizontal and vertical flips, each with probability 1/2"),
    AugmentOp("rot90", None, meaning="rotation by 0, 90, 180 or 270 degrees"),
    AugmentOp(
        "hed", 0.05, 0.0, 1.0,
        "haematoxylin, eosin and DAB concentrations scaled by U(1-s, 1+s) and shifted by "
        "U(-s, s) optical density units",
    ),
    AugmentOp(
        "colour", 0.1, 0.0, 0.99,
        "brightness, contrast and saturation each scaled by U(1-s, 1+s)",
    ),
    AugmentOp("hue", 0.02, 0.0, 0.5, "hue rotated by U(-s, s) of a full turn"),
    AugmentOp("blur", 1.0, 0.0, 8.0, "Gaussian blur of sigma U(0, s) px of the patch"),
)  # fmt: skip
OP_NAMES = tuple(op.name for op in OPS)
DEFAULT_OPS = ("flip", "rot90", "hed", "colour", "blur")
_BY_NAME = {op.name: op for op in OPS}


@dataclass(frozen=True)
class AugmentSpec:
    """The augmentation of ``views`` views per patch: ``ops`` in application order, the
    strength of each op that has one, and the ``seed`` every view's random draws derive from."""

    views: int
    ops: tuple[str, ...]
    strengths: dict[str, float]
    seed: int

    def to_record(self) -> dict[str, Any]:
        """The JSON-able record stored in feature files (``augmentation``) and configs."""
        return {
            "views": self.views,
            "ops": list(self.ops),
            "strengths": dict(self.strengths),
            "seed": self.seed,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_record(), sort_keys=True)


def parse_ops(value: Any) -> tuple[str, ...]:
    """``"flip,rot90"`` or a list -> the ops in application order (unknown or repeated names are a
    ``ValueError`` listing the known ones)."""
    names = _names(value)
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(
            f"unknown augmentation {', '.join(unknown)}: choose from {', '.join(OP_NAMES)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"augmentation {', '.join(repeated)} given twice")
    return tuple(n for n in OP_NAMES if n in names)


def parse_strengths(value: Any) -> dict[str, float]:
    """``"hed=0.05,blur=1.5"`` or a mapping -> ``{op: strength}``, each within its op's range."""
    if value is None:
        return {}
    if isinstance(value, str):
        items: dict[str, Any] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            key, sep, number = part.partition("=")
            if not sep:
                raise ValueError(f"strength {part!r} must be OP=VALUE (e.g. hed=0.05)")
            items[key.strip()] = number.strip()
        value = items
    if not isinstance(value, dict):
        raise ValueError("strengths must be OP=VALUE pairs (e.g. hed=0.05,blur=1.0)")
    strengths: dict[str, float] = {}
    for key, raw in value.items():
        op = _BY_NAME.get(key)
        if op is None or op.default is None:
            settable = ", ".join(o.name for o in OPS if o.default is not None)
            raise ValueError(f"no strength to set for {key!r}: ops with a strength are {settable}")
        try:
            number = float(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"strength {key}={raw!r} is not a number") from e
        if not op.low <= number <= op.high:
            raise ValueError(f"strength {key}={number} is outside [{op.low}, {op.high}]")
        strengths[key] = number
    return strengths


def augment_spec(views: int, ops: Any, strengths: Any = None, seed: int = 0) -> AugmentSpec | None:
    """The resolved spec (defaults filled in for the chosen ops), or ``None`` when ``views`` is 0.

    Raises ``ValueError`` for views asked with no op, or a strength given for an op not chosen
    (it would silently do nothing).
    """
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    chosen = parse_ops(ops)
    given = parse_strengths(strengths)
    if views == 0:
        return None
    if not chosen:
        raise ValueError(f"{views} views asked with no augmentation: choose from "
                         f"{', '.join(OP_NAMES)}")  # fmt: skip
    unused = sorted(set(given) - set(chosen))
    if unused:
        raise ValueError(
            f"strength given for {', '.join(unused)}, which is not among the augmentations "
            f"({', '.join(chosen)})"
        )
    resolved = {
        name: given.get(name, _BY_NAME[name].default)
        for name in chosen
        if _BY_NAME[name].default is not None
    }
    return AugmentSpec(views=views, ops=chosen, strengths=resolved, seed=int(seed))


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list | tuple):
        return [str(p).strip() for p in value]
    raise ValueError("augmentations must be a comma-separated list (e.g. flip,rot90,hed)")
