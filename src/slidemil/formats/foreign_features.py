"""Feature files written by other tools, read into :class:`FeatureBag` so users keep their work.

- CLAM ``h5_files/<slide>.h5`` (``extract_features_fp.py``): datasets ``features`` float32 (N, D)
  and ``coords`` int32 (N, 2) level-0 px in the patch file's order, appended batch by batch,
  and no attributes at all: the patch geometry is in CLAM's patch file (``features`` stored as
  (1, N, D) is read as (N, D)).
- CLAM ``pt_files/<slide>.pt``: ``torch.save`` of a float tensor (N, D), no coordinates (coords
  come back as zeros and ``attrs["has_coords"]`` is False).
- TRIDENT ``features_<encoder>/<slide>.h5``: ``features`` (N, D) with attributes ``name``,
  ``savetodir``, ``encoder``; ``coords`` (N, 2) with the patch file's attributes
  (``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ...); ``None`` values are stored as the string ``"None"``. Its ``.pt`` option saves the NumPy
  array itself, which is read too.

``source_format`` says which ("clam-h5", "clam-pt", "trident", "trident-pt"); attributes of the
``features`` dataset, ``coords`` and the root are merged into ``attrs`` (root last).

:func:`feature_folder` and :func:`find_feature_file` find a slide's bag in a folder of any of
these (CLAM's ``--feat_dir`` itself, with its ``h5_files/`` and ``pt_files/``, included).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.errors import ArtifactError
from slidemil.formats.foreign_patches import read_foreign_attr

TRIDENT_MARKERS = (
    "level0_magnification", "target_magnification", "patch_size_level0", "savetodir",
)  # fmt: skip
# CLAM's extract_features_fp.py writes both under its --feat_dir; the .h5 also has coords.
CLAM_FEATURE_FOLDERS = ("h5_files", "pt_files")
FEATURE_SUFFIXES = (".h5", ".pt")


def feature_folder(folder: str | Path) -> Path:
    """Where the bags are: ``folder`` itself, or CLAM's ``h5_files/`` (else ``pt_files/``) when
    ``folder`` is a CLAM ``--feat_dir``."""
    folder = Path(folder)
    for name in CLAM_FEATURE_FOLDERS:
        if (folder / name).is_dir():
            return folder / name
    return folder


def find_feature_file(folder: str | Path, slide_id: str) -> Path:
    """``<folder>/<slide_id>.h5``, or ``<slide_id>.pt`` where only that exists (CLAM's
    ``pt_files``, TRIDENT's ``.pt`` option); the ``.h5`` path when neither does, for the error."""
    folder = Path(folder)
    for suffix in FEATURE_SUFFIXES:
        path = folder / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return folder / f"{slide_id}{FEATURE_SUFFIXES[0]}"


def read_foreign_feature_file(path: str | Path, *, dtype: Any = np.float32) -> Any:
    """A CLAM (.h5 / .pt) or TRIDENT (.h5) feature file as a ``FeatureBag``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "feature file not found")
    if path.suffix == ".pt":
        return _read_clam_pt(path, dtype)
    return _read_h5(path, dtype)


def pt_feature_shape(path: str | Path) -> tuple[tuple[int, ...], int]:
    """The shape and item size (bytes) of a ``.pt`` bag, memory-mapped: the features of a
    tensor file are not read (probing a cohort stays cheap)."""
    loaded = _load_pt(Path(path), mmap=True)
    shape = tuple(int(n) for n in loaded.shape)
    itemsize = loaded.element_size() if _is_tensor(loaded) else loaded.dtype.itemsize
    return shape, int(itemsize)


def read_pt_features(path: str | Path) -> np.ndarray:
    """A ``.pt`` bag's features (N, D) in their stored dtype."""
    path = Path(path)
    loaded = _load_pt(path, mmap=False)
    if _is_tensor(loaded):
        import torch

        # NumPy has no bfloat16: widen it, keep float16 / float32 as stored
        half_or_wider = loaded.dtype in (torch.float16, torch.float32, torch.float64)
        loaded = (loaded if half_or_wider else loaded.float()).numpy()
    return _as_2d(path, loaded)


def _is_tensor(value: Any) -> bool:
    import torch

    return torch.is_tensor(value)


def _load_pt(path: Path, *, mmap: bool) -> Any:
    """The tensor (CLAM) or NumPy array (TRIDENT) a ``.pt`` file holds, or an ArtifactError."""
    import torch

    try:
        # TRIDENT's .pt holds a NumPy array: allow exactly what rebuilds one, nothing else.
        with torch.serialization.safe_globals(_numpy_array_globals()):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # files in torch's legacy (pre-zip) format cannot be memory-mapped
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: say what
        # is wrong instead
        detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise ArtifactError(
            path,
            f"cannot read .pt features: not a tensor or array saved with torch.save, or "
            f"truncated ({' '.join(detail.split())[:200]})",
            "extract its features again",
        ) from e
    except Exception as e:  # torch raises many types for a broken or foreign file
        detail = " ".join(str(e).split())[:300]
        raise ArtifactError(path, f"cannot read .pt features: {type(e).__name__}: {detail}") from e
    if isinstance(loaded, np.ndarray) or torch.is_tensor(loaded):
        return loaded
    raise ArtifactError(path, f"expected a tensor (N, D), found {type(loaded).__name__}")


def _read_clam_pt(path: Path, dtype: Any) -> Any:
    from slidemil.formats.feature_file import FeatureBag

    loaded = _load_pt(path, mmap=False)
    if _is_tensor(loaded):
        array, source = loaded.float().numpy(), "clam-pt"
    else:
        array, source = loaded, "trident-pt"
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
                    attrs.update({k: read_foreign_attr(node.attrs, k) for k in node.attrs})
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


def _as_2d(path: Path, features: np.ndarray) -> np.ndarray:
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM batch dimension
        features = features[0]
    if features.ndim == 1 and features.size == 0:  # TRIDENT's empty bag of unknown width
        features = features.reshape(0, 0)
    if features.ndim != 2:
        raise ArtifactError(path, f"'features' must be 2-D (N, D), found {features.shape}")
    return features
