"""Feature files: ``features/<encoder>/<slide_id>.h5``, one bag of patch embeddings per slide.

Layout (``format_version`` 1)::

    /features   float16 or float32 (N, D)  one row per patch
    /coords     int64 (N, 2)               level-0 top-left x, y, the same rows as the patch file
    /views      float16 or float32 (K, N, D)  K augmented views of every patch (absent when K = 0;
                            ``/features`` are the plain patches either way)
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
        n_views             K (0 when the file has no views; absent in older files: 0)
        augmentation        JSON: views, ops, strengths, seed of the views (null when K = 0)
        stain_normalization JSON: the stain normaliser's state applied before the encoder (method,
                            fitted parameters, target file name + sha256), or null

The file is written under a temp name in the same folder (rows streamed in as batches finish)
and renamed when complete, so a file at the final path is always whole.
"""

from __future__ import annotations

import json
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
FEATURE_IDENTITY_KEYS = ("encoder", "weights_identity", "dtype", "transform", "stain_normalization")
# The value a key has in an identity recorded before the key existed (absent means "not used"), so
# features normalised since are never mixed with older, unnormalised ones.
IDENTITY_DEFAULTS: dict[str, Any] = {"stain_normalization": None}


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

        with FeatureWriter(path, coords, dim=1024, dtype="float16", attrs=attrs, views=2) as out:
            out.write(chunk, views)   # (rows, D) and (2, rows, D), any float; cast to ``dtype``

    ``views``: K augmented views stored in ``/views`` (K, N, D) next to the plain ``/features``
    (0: no ``/views`` dataset); ``n_views`` is recorded either way.
    """

    def __init__(
        self,
        path: str | Path,
        coords: np.ndarray,
        *,
        dim: int,
        dtype: str | np.dtype,
        attrs: dict[str, Any],
        views: int = 0,
    ):
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.dim, self.dtype, self.attrs = int(dim), np.dtype(dtype), attrs
        self.views = int(views)
        self.rows = 0
        self._tmp: Path | None = None
        self._file: h5py.File | None = None
        self._features: h5py.Dataset | None = None
        self._views: h5py.Dataset | None = None

    def __enter__(self) -> FeatureWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path_for(self.path)
        self._file = h5py.File(self._tmp, "w")
        shape = (self.coords.shape[0], self.dim)
        self._features = self._file.create_dataset(
            "features", shape=shape, dtype=self.dtype, chunks=_chunks(shape)
        )
        self._file.create_dataset("coords", data=self.coords)
        if self.views:
            chunks = _chunks(shape)
            self._views = self._file.create_dataset(
                "views", shape=(self.views, *shape), dtype=self.dtype,
                chunks=None if chunks is None else (1, *chunks),
            )  # fmt: skip
        return self

    def write(self, chunk: np.ndarray, views: np.ndarray | None = None) -> None:
        """Append the next ``len(chunk)`` rows, and their views ((K, rows, D)) when K > 0."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != self.dim:
            raise ValueError(f"feature chunk {chunk.shape} must be (rows, {self.dim})")
        if (views is None) != (self.views == 0):
            raise ValueError(f"{self.views} views per patch expected, got {views is not None}")
        stop = self.rows + chunk.shape[0]
        if stop > self.coords.shape[0]:
            raise ValueError(f"{stop} feature rows for {self.coords.shape[0]} coords")
        if views is not None:
            views = np.asarray(views)
            if views.shape != (self.views, *chunk.shape):
                raise ValueError(f"view chunk {views.shape} must be {(self.views, *chunk.shape)}")
        if chunk.shape[0]:
            self._features[self.rows : stop] = chunk.astype(self.dtype, copy=False)
            if views is not None:
                self._views[:, self.rows : stop] = views.astype(self.dtype, copy=False)
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
                        "n_views": self.views,
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
    views: np.ndarray | None = None,
) -> Path:
    """Write a bag atomically. ``attrs`` should hold at least ``slide_id`` and ``encoder``;
    ``views``: (K, N, D) augmented views (their ``augmentation`` record belongs in ``attrs``)."""
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise ValueError(
            f"features {features.shape} and coords {coords.shape} must have the same rows"
        )
    k = 0 if views is None else int(np.shape(views)[0])
    with FeatureWriter(
        path, coords, dim=features.shape[1], dtype=features.dtype, attrs=attrs, views=k
    ) as out:
        out.write(features, views if k else None)
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


def read_views(
    path: str | Path, *, view: int | None = None, dtype: np.dtype | None = np.float32
) -> np.ndarray:
    """The augmented views of a bag: (K, N, D), or only view ``view`` as (N, D).

    A file without views (K = 0, including CLAM's and TRIDENT's) gives an empty (0, N, D) array;
    asking it for one ``view`` is an :class:`~slidemil.errors.ArtifactError`, as is a file whose
    views do not match its features. ``dtype=None`` keeps the stored dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "feature file not found")
    if _is_foreign(path):
        bag = read_feature_file(path, dtype=dtype)
        views = np.zeros((0, *bag.features.shape), bag.features.dtype)
    else:
        try:
            with h5py.File(path, "r") as f:
                k = _checked_view_count(path, f)
                if "views" not in f:
                    shape = f["features"].shape
                    views = np.zeros((0, *shape), f["features"].dtype)
                elif view is None:
                    views = f["views"][:]
                elif 0 <= view < k:
                    views = f["views"][view]
                else:
                    raise ArtifactError(path, f"has {k} views, no view {view}")
        except ArtifactError:
            raise
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(path, f"unreadable or truncated feature file: {e}") from e
    if view is not None and views.ndim == 3:
        raise ArtifactError(path, f"has no views, no view {view} (extract with --views)")
    return views if dtype is None else views.astype(dtype, copy=False)


def count_views(path: str | Path) -> int:
    """K, the augmented views per patch a feature file holds (0: none), without reading them."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "feature file not found")
    if _is_foreign(path):
        return 0
    try:
        with h5py.File(path, "r") as f:
            return _checked_view_count(path, f)
    except OSError as e:
        raise ArtifactError(path, f"unreadable or truncated feature file: {e}") from e


def _checked_view_count(path: Path, f: h5py.File) -> int:
    """The file's K, after checking ``/views`` is (K, N, D) for ``/features`` (N, D) and agrees
    with the ``n_views`` attribute."""
    if "features" not in f:
        raise ArtifactError(path, "no 'features' dataset: not a feature file")
    recorded = int(read_attr(f.attrs, "n_views", 0) or 0)
    if "views" not in f:
        if recorded:
            raise ArtifactError(path, f"records n_views={recorded} but has no 'views' dataset")
        return 0
    shape, expected = f["views"].shape, f["features"].shape
    if len(shape) != 3 or tuple(shape[1:]) != tuple(expected) or shape[0] != recorded:
        raise ArtifactError(
            path, f"'views' {shape} does not match n_views={recorded} and features {expected}"
        )
    return int(shape[0])


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
    attrs: dict[str, Any] | None = None,
) -> bool:
    """True when ``path`` is a readable slidemil feature file (of ``encoder``, with ``rows``
    patches and made from patches with fingerprint ``patch_fingerprint_``, where given: a slide
    re-patched since has to be encoded again, even when its patch count is the same).

    ``attrs``: root attributes the file must record with these values (JSON values compare as
    JSON; an absent ``n_views`` counts as 0, any other absent attribute as ``None``): a file
    with fewer views, or views made with other augmentation options, is not done. Its
    ``/views`` must then match its features.
    """
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
            for key, value in (attrs or {}).items():
                default = 0 if key == "n_views" else None
                if read_attr(f.attrs, key, default) != json.loads(json.dumps(value)):
                    return False
            if attrs and "n_views" in attrs:
                _checked_view_count(Path(path), f)
            if patch_fingerprint_ is None:
                return True
            recorded = read_attr(f.attrs, "patch_fingerprint")
            if recorded is None:  # written before fingerprints: derive it from what was copied
                geometry = {k: read_attr(f.attrs, k) for k in FINGERPRINT_GEOMETRY}
                recorded = patch_fingerprint(f["coords"][:], geometry)
    except (OSError, KeyError, ValueError, TypeError, ArtifactError):
        return False
    return recorded == patch_fingerprint_
