"""Feature files written by other tools, read into :class:`FeatureBag` so users keep their work.

- CLAM ``h5_files/<slide>.h5`` (``extract_features_fp.py``): datasets ``features`` float32 (N, D)
  and ``coords`` (N, 2) level-0 px, no attributes (older files may hold ``features`` as
  (1, N, D)).
- CLAM ``pt_files/<slide>.pt``: ``torch.save`` of a float tensor (N, D), no coordinates (coords
  come back as zeros and ``attrs["has_coords"]`` is False).
- TRIDENT ``features_<encoder>/<slide>.h5``: ``features`` (N, D) with attributes ``name``,
  ``savetodir``, ``encoder``; ``coords`` (N, 2) with the patch file's attributes
  (``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ...); ``None`` values are stored as the string ``"None"``. Its ``.pt`` option saves the NumPy
  array itself, which is read too.

``source_format`` says which ("clam-h5", "clam-pt", "trident", "trident-pt"); attributes of the
``features`` dataset, ``coords`` and the root are merged into ``attrs`` (root last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.errors import ArtifactError
from slidemil.formats.h5 import read_attr

TRIDENT_MARKERS = (
    "level0_magnification", "target_magnification", "patch_size_level0", "savetodir",
)  # fmt: skip


def read_foreign_feature_file(path: str | Path, *, dtype: Any = np.float32) -> Any:
    """A CLAM (.h5 / .pt) or TRIDENT (.h5) feature file as a ``FeatureBag``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "feature file not found")
    if path.suffix == ".pt":
        return _read_clam_pt(path, dtype)
    return _read_h5(path, dtype)


def _read_clam_pt(path: Path, dtype: Any) -> Any:
    import torch

    from slidemil.formats.feature_file import FeatureBag

    try:
        # TRIDENT's .pt holds a NumPy array: allow exactly what rebuilds one, nothing else.
        with torch.serialization.safe_globals(_numpy_array_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(path, f"cannot read .pt features: {type(e).__name__}: {e}") from e
    if torch.is_tensor(loaded):
        array, source = loaded.float().numpy(), "clam-pt"
    elif isinstance(loaded, np.ndarray):
        array, source = loaded, "trident-pt"
    else:
        raise ArtifactError(path, f"expected a tensor (N, D), found {type(loaded).__name__}")
    features = _as_2d(path, array)
    coords = np.zeros((features.shape[0], 2), np.int64)
    attrs = {"source_format": source, "has_coords": False, "feature_dim": features.shape[1]}
    return FeatureBag(_cast(features, dtype), coords, attrs)


def _numpy_array_globals() -> list[Any]:
    reconstruct = getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64")]
    return [reconstruct, np.ndarray, np.dtype, *dtypes]


def _read_h5(path: Path, dtype: Any) -> Any:
    from slidemil.formats.feature_file import FeatureBag

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ArtifactError(path, "no 'features' dataset: not a feature file")
            features = _as_2d(path, f["features"][:])
            attrs: dict[str, Any] = {}
            for node in (f["features"], f.get("coords"), f):
                if node is not None:
                    attrs.update({k: _foreign_attr(node.attrs, k) for k in node.attrs})
            if "coords" in f:
                coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
                has_coords = True
            else:
                coords, has_coords = np.zeros((features.shape[0], 2), np.int64), False
    except ArtifactError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(path, f"unreadable or truncated feature file: {e}") from e
    if coords.shape[0] != features.shape[0]:
        raise ArtifactError(path, f"{features.shape[0]} feature rows but {coords.shape[0]} coords")
    trident = any(k in attrs for k in TRIDENT_MARKERS)
    attrs.update(
        source_format="trident" if trident else "clam-h5",
        has_coords=has_coords,
        feature_dim=int(features.shape[1]),
    )
    return FeatureBag(_cast(features, dtype), coords, attrs)


def _cast(features: np.ndarray, dtype: Any) -> np.ndarray:
    """``dtype=None`` keeps the stored dtype (numpy's ``astype(None)`` would mean float64)."""
    return features if dtype is None else features.astype(dtype, copy=False)


def _foreign_attr(attrs: Any, key: str) -> Any:
    value = read_attr(attrs, key)
    return None if value == "None" else value  # TRIDENT's spelling of a missing value


def _as_2d(path: Path, features: np.ndarray) -> np.ndarray:
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM batch dimension
        features = features[0]
    if features.ndim == 1 and features.size == 0:  # TRIDENT's empty bag of unknown width
        features = features.reshape(0, 0)
    if features.ndim != 2:
        raise ArtifactError(path, f"'features' must be 2-D (N, D), found {features.shape}")
    return features
