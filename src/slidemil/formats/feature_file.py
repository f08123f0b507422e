"""Feature files: ``features/<encoder>/<slide_id>.h5``, one bag of patch embeddings per slide.

Layout (``format_version`` 1)::

    /features   float16 or float32 (N, D)  one row per patch
    /coords     int64 (N, 2)               level-0 top-left x, y, the same rows as the patch file
    root attrs:
        format_version, slidemil_version, slide_id
        encoder             registry name (e.g. "resnet50-trunc")
        weights             weights identity (tag, file name + sha256, or "random")
        feature_dim         D
        dtype               "float16" | "float32"
        transform           JSON: input size, resize, mean, std
        patch_size, patch_size_level0, read_level, target_mpp, magnification, slide_mpp
                            copied from the patch file so heatmaps need nothing else
        source_format       "slidemil" (files read from CLAM or TRIDENT say so)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.atomic import atomic_path
from slidemil.errors import ArtifactError
from slidemil.formats.h5 import provenance, read_attr, write_attrs

FEATURE_FORMAT_VERSION = 1


@dataclass
class FeatureBag:
    """One slide's patch features, their coordinates and provenance attributes."""

    features: np.ndarray  # (N, D)
    coords: np.ndarray  # int64 (N, 2)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def encoder(self) -> str | None:
        return self.attrs.get("encoder")


def write_feature_file(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write a bag atomically. ``attrs`` should hold at least ``slide_id`` and ``encoder``."""
    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise ValueError(
            f"features {features.shape} and coords {coords.shape} must have the same rows"
        )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features, chunks=_chunks(features))
        f.create_dataset("coords", data=coords)
        write_attrs(
            f.attrs,
            {
                "format_version": FEATURE_FORMAT_VERSION,
                **provenance(),
                "feature_dim": int(features.shape[1]),
                "dtype": str(features.dtype),
                "source_format": "slidemil",
                **attrs,
            },
        )
    return path


def _chunks(features: np.ndarray) -> tuple[int, int] | None:
    if features.shape[0] == 0:
        return None
    return (min(features.shape[0], 1024), features.shape[1])


def read_feature_attrs(path: str | Path) -> dict[str, Any]:
    """Only the attributes (cheap: no feature data is read)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return {k: read_attr(f.attrs, k) for k in f.attrs}
    except OSError as e:
        raise ArtifactError(path, f"unreadable or truncated feature file: {e}") from e


def read_feature_file(path: str | Path, *, dtype: np.dtype | None = np.float32) -> FeatureBag:
    """Read a feature file into memory (``dtype=None`` keeps the stored dtype).

    CLAM (``.h5`` / ``.pt``) and TRIDENT files are read too; ``attrs["source_format"]`` says which.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "feature file not found")
    if _is_foreign(path):
        from slidemil.formats.foreign_features import read_foreign_feature_file

        return read_foreign_feature_file(path, dtype=dtype)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ArtifactError(path, "no 'features' dataset: not a feature file")
            features = f["features"][:]
            if features.ndim != 2:
                raise ArtifactError(path, f"'features' must be 2-D (N, D), found {features.shape}")
            if "coords" in f:
                coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            else:
                coords = np.zeros((features.shape[0], 2), np.int64)
            if coords.shape[0] != features.shape[0]:
                raise ArtifactError(
                    path, f"{features.shape[0]} feature rows but {coords.shape[0]} coords"
                )
            attrs = {k: read_attr(f.attrs, k) for k in f.attrs}
    except ArtifactError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(path, f"unreadable or truncated feature file: {e}") from e
    if dtype is not None:
        features = features.astype(dtype, copy=False)
    return FeatureBag(features, coords, attrs)


def _is_foreign(path: Path) -> bool:
    """CLAM ``.pt`` tensors and HDF5 files without slidemil's ``format_version`` (CLAM, TRIDENT)."""
    if path.suffix == ".pt":
        return True
    try:
        with h5py.File(path, "r") as f:
            return "format_version" not in f.attrs
    except OSError:
        return False  # the slidemil reader reports the truncated file


def is_complete_feature_file(path: str | Path, encoder: str | None = None) -> bool:
    """True when ``path`` is a readable slidemil feature file (of ``encoder``, if given)."""
    try:
        attrs = read_feature_attrs(path)
        with h5py.File(path, "r") as f:
            ok = (
                "features" in f and "coords" in f and f["features"].shape[0] == f["coords"].shape[0]
            )
    except (ArtifactError, OSError, KeyError):
        return False
    if not ok or attrs.get("format_version") is None:
        return False
    return encoder is None or attrs.get("encoder") == encoder
