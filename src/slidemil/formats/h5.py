"""Small HDF5 helpers shared by the artifact formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil import __version__
from slidemil.errors import ArtifactError


def attr_value(value: Any) -> Any:
    """A value HDF5 can store as an attribute (dicts and lists of mixed types go to JSON)."""
    if value is None:
        return "null"
    if isinstance(value, dict | list | tuple) and not _is_numeric_sequence(value):
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _is_numeric_sequence(value) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        for v in value
    )


def read_attr(attrs: h5py.AttributeManager, name: str, default: Any = None) -> Any:
    """An attribute decoded back to Python (bytes to str, "null" to None, numpy scalars)."""
    if name not in attrs:
        return default
    value = attrs[name]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        if value == "null":
            return None
        if value[:1] in "[{":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_attrs(target: h5py.AttributeManager, values: dict[str, Any]) -> None:
    for key, value in values.items():
        target[key] = attr_value(value)


def provenance() -> dict[str, str]:
    return {"slidemil_version": __version__}


def read_root_attrs(path: str | Path, kind: str) -> dict[str, Any]:
    """The root attributes of an artifact file without reading its datasets (cheap).

    ``kind`` names the file in the error (e.g. ``"feature"``, ``"attention"``).
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return {k: read_attr(f.attrs, k) for k in f.attrs}
    except OSError as e:
        raise ArtifactError(path, f"unreadable or truncated {kind} file: {e}") from e
