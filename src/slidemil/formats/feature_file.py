"""Feature files: ``features/<encoder>/<slide_id>.h5``, one bag of patch embeddings per slide.

Layout (``format_version`` 1)::

    /features   float16 or float32 (N, D)  one row per patch
    /coords     int64 (N, 2)               level-0 top-left x, y, the same rows as the patch file
    root attrs:
        format_version, slidemil_version, slide_id, slide_path
        encoder             registry name (e.g. "resnet50-trunc")
        weights             weights identity (torchvision tag, hub id, file name + sha256, or
                            "random:seed=0")
        feature_dim         D
        dtype               "float16" | "float32" (stored)
        precision           autocast dtype of the forward pass ("float32" on CPU)
        transform           JSON: resize, crop, mean, std, interpolation
        input_size          px the encoder received (after resize / crop)
        patch_size, patch_size_level0, read_level, read_size, target_mpp, magnification,
        slide_mpp, target_downsample, step, slide_dimensions
                            copied from the patch file so heatmaps need nothing else
        patch_fingerprint   hash of the patch file's coords and read geometry
                            (:func:`~slidemil.formats.patch_file.patch_fingerprint`): features
                            of a slide re-patched since no longer match and are redone
        source_format       "slidemil" (files read from CLAM or TRIDENT say so)

The file is written under a temp name in the same folder (rows streamed in as batches finish)
and renamed when complete, so a file at the final path is always whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from slidemil.atomic import temp_path_for
from slidemil.errors import ArtifactError
from slidemil.formats.h5 import provenance, read_attr, read_root_attrs, write_attrs
from slidemil.formats.patch_file import FINGERPRINT_GEOMETRY, patch_fingerprint

FEATURE_FORMAT_VERSION = 1
# What makes two sets of features comparable (recorded by extraction, checked by prediction): a
# folder, and a model, only ever sees features that agree on all of these.
FEATURE_IDENTITY_KEYS = ("encoder", "weights_identity", "dtype", "transform")


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


class FeatureWriter:
    """Stream one slide's features into a feature file: rows arrive in order, in chunks.

    Use as a context manager; the file appears at ``path`` only when every row was written and
    the block exits cleanly (a temp file in the same folder is renamed), else nothing appears::

        with FeatureWriter(path, coords, dim=1024, dtype="float16", attrs=attrs) as out:
            out.write(chunk)          # (rows, D), any float dtype; cast to ``dtype``
    """

    def __init__(
        self,
        path: str | Path,
        coords: np.ndarray,
        *,
        dim: int,
        dtype: str | np.dtype,
        attrs: dict[str, Any],
    ):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.dim, self.dtype, self.attrs = int(dim), np.dtype(dtype), attrs
        self.rows = 0
        self._tmp: Path | None = None
        self._file: h5py.File | None = None
        self._features: h5py.Dataset | None = None

    def __enter__(self) -> FeatureWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path_for(self.path)
        self._file = h5py.File(self._tmp, "w")
        shape = (self.coords.shape[0], self.dim)
        self._features = self._file.create_dataset(
            "features", shape=shape, dtype=self.dtype, chunks=_chunks(shape)
        )
        self._file.create_dataset("coords", data=self.coords)
        return self

    def write(self, chunk: np.ndarray) -> None:
        """Append the next ``len(chunk)`` rows."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != self.dim:
            raise ValueError(f"feature chunk {chunk.shape} must be (rows, {self.dim})")
        stop = self.rows + chunk.shape[0]
        if stop > self.coords.shape[0]:
            raise ValueError(f"{stop} feature rows for {self.coords.shape[0]} coords")
        if chunk.shape[0]:
            self._features[self.rows : stop] = chunk.astype(self.dtype, copy=False)
        self.rows = stop

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        complete = kind is None and self.rows == self.coords.shape[0]
        try:
            if complete:
                write_attrs(
                    self._file.attrs,
                    {
                        "format_version": FEATURE_FORMAT_VERSION,
                        **provenance(),
                        "feature_dim": self.dim,
                        "dtype": str(self.dtype),
                        "source_format": "slidemil",
                        **self.attrs,
                    },
                )
            self._file.close()
            if complete:
                self._tmp.replace(self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        if kind is None and not complete:
            raise ValueError(
                f"{self.path}: {self.rows} feature rows written for {self.coords.shape[0]} coords"
            )


def write_feature_file(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write a bag atomically. ``attrs`` should hold at least ``slide_id`` and ``encoder``."""
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise ValueError(
            f"features {features.shape} and coords {coords.shape} must have the same rows"
        )
    with FeatureWriter(
        path, coords, dim=features.shape[1], dtype=features.dtype, attrs=attrs
    ) as out:
        out.write(features)
    return Path(path)


def _chunks(shape: tuple[int, int]) -> tuple[int, int] | None:
    if shape[0] == 0 or shape[1] == 0:
        return None
    return (min(shape[0], 1024), shape[1])


def read_feature_attrs(path: str | Path) -> dict[str, Any]:
    """Only the attributes (cheap: no feature data is read)."""
    return read_root_attrs(path, "feature")


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


def is_complete_feature_file(
    path: str | Path,
    encoder: str | None = None,
    rows: int | None = None,
    patch_fingerprint_: str | None = None,
) -> bool:
    """True when ``path`` is a readable slidemil feature file (of ``encoder``, with ``rows``
    patches and made from patches with fingerprint ``patch_fingerprint_``, where given: a slide
    re-patched since has to be encoded again, even when its patch count is the same)."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return False
            n = f["features"].shape[0]
            if n != f["coords"].shape[0] or read_attr(f.attrs, "format_version") is None:
                return False
            found = read_attr(f.attrs, "encoder")
            if (encoder is not None and found != encoder) or (rows is not None and n != rows):
                return False
            if patch_fingerprint_ is None:
                return True
            recorded = read_attr(f.attrs, "patch_fingerprint")
            if recorded is None:  # written before fingerprints: derive it from what was copied
                geometry = {k: read_attr(f.attrs, k) for k in FINGERPRINT_GEOMETRY}
                recorded = patch_fingerprint(f["coords"][:], geometry)
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return recorded == patch_fingerprint_
