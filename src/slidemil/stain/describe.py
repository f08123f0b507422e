"""A recorded stain normalisation state in a few words, for messages (no torch import)."""

from __future__ import annotations

import json
from typing import Any


def describe_stain_state(state: dict[str, Any] | None) -> str:
    """``"macenko fitted on target.png (sha256 1a2b3c4d…)"``, or ``"no stain normalisation"``."""
    if not state:
        return "no stain normalisation"
    target = state.get("target") or {}
    digest = str(target.get("sha256") or "")[:8]
    return f"{state.get('method')} fitted on {target.get('name')} (sha256 {digest}…)"


def same_stain_state(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two recorded states describe the same normalisation (``None``: none): the same
    method, fitted parameters and target file."""

    def canonical(state: dict[str, Any] | None) -> str:
        return json.dumps(state or None, sort_keys=True)

    return canonical(a) == canonical(b)
