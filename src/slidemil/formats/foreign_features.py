"""Feature files written by other tools, read into :class:`FeatureBag` so users keep their work.

- CLAM ``h5_files/<slide>.h5``: datasets ``features`` (N, D) (sometimes (1, N, D)) and ``coords``
  (N, 2) level-0 px, ``patch_level`` / ``patch_size`` attributes on ``coords``.
- CLAM ``pt_files/<slide>.pt``: a tensor (N, D) and no coordinates (coords come back as zeros and
  ``attrs["has_coords"]`` is False).
- TRIDENT ``features_<encoder>/<slide>.h5``: ``features`` (N, D) and ``coords`` (N, 2) whose
  attributes hold ``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``.

``source_format`` says which ("clam-h5", "clam-pt", "trident"); attributes of the root, ``coords``
and ``features`` are merged into ``attrs`` (root first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.errors import ArtifactError
from slidemil.formats.h5 import read_attr

TRIDENT_MARKERS = ("level0_magnification", "target_magnification", "patch_size_level0")


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
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(path, f"cannot read CLAM .pt features: {type(e).__name__}: {e}") from e
    if not torch.is_tensor(tensor):
        raise ArtifactError(path, f"expected a tensor (N, D), found {type(tensor).__name__}")
    features = _as_2d(path, tensor.float().numpy())
    coords = np.zeros((features.shape[0], 2), np.int64)
    attrs = {"source_format": "clam-pt", "has_coords": False, "feature_dim": features.shape[1]}
    return FeatureBag(features.astype(dtype, copy=False), coords, attrs)


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
                    attrs.update({k: read_attr(node.attrs, k) for k in node.attrs})
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
    return FeatureBag(features.astype(dtype, copy=False), coords, attrs)


def _as_2d(path: Path, features: np.ndarray) -> np.ndarray:
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM batch dimension
        features = features[0]
    if features.ndim != 2:
        raise ArtifactError(path, f"'features' must be 2-D (N, D), found {features.shape}")
    return features
