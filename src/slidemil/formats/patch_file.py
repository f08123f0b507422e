"""Patch files: ``patches/<slide_id>.h5``, the coordinates of every patch of a slide.

Layout (``format_version`` 1)::

    /coords            int64 (N, 2)  level-0 x, y of each patch's top-left corner
        attrs: patch_level, patch_size    (CLAM's names: read level, and px read at that level)
    root attrs:
        format_version, slidemil_version, slide_id, slide_path
        patch_size          px of a patch at the target resolution (what the encoder receives)
        patch_size_level0   footprint of a patch in level-0 px (float)
        step                px between patch origins at the target resolution (= patch_size: none)
        read_level          pyramid level read
        read_size           px read at read_level (then resized to patch_size)
        target_downsample   level-0 px per target px
        target_mpp          µm/px of the patches, or null when patching by magnification
        magnification       target magnification, or null when patching by µm/px
        slide_mpp           level-0 µm/px used
        slide_dimensions    [width, height] at level 0
        min_tissue          tissue fraction a patch needed
        segmentation        JSON of the segmentation parameters (or the user mask's path)
        source_format       "slidemil" (files read from CLAM or TRIDENT say so)

The file is written to a temp name and renamed, so a file at the final path is complete.
:func:`read_patch_file` also reads CLAM's and TRIDENT's patch files
(see :mod:`slidemil.formats.foreign_patches`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from slidemil.atomic import atomic_path
from slidemil.errors import ArtifactError
from slidemil.formats.h5 import provenance, read_attr, write_attrs

if TYPE_CHECKING:
    from slidemil.slide import Slide

PATCH_FORMAT_VERSION = 1
# The geometry of a patch set that later artifacts (feature and attention files) carry along, so
# a heat map can place every patch without the patch file.
PATCH_GEOMETRY_KEYS = (
    "patch_size", "patch_size_level0", "read_level", "read_size", "target_downsample", "step",
    "target_mpp", "magnification", "slide_mpp", "slide_dimensions",
)  # fmt: skip
# What places a patch on the slide: with the coordinates, these make a patch set's fingerprint.
FINGERPRINT_GEOMETRY = ("patch_size", "read_level", "read_size", "target_downsample")


@dataclass
class PatchSet:
    """The patches of one slide and how to read them.

    To get a patch's pixels: read ``read_size`` x ``read_size`` px at ``read_level`` from
    level-0 ``coords[i]`` and resize to ``patch_size`` (no resize when they are equal).
    """

    coords: np.ndarray  # int64 (N, 2), level-0 top-left x, y
    patch_size: int
    read_level: int
    read_size: int
    target_downsample: float
    slide_id: str = ""
    slide_path: str | None = None
    step: int | None = None
    target_mpp: float | None = None
    magnification: float | None = None
    slide_mpp: float | None = None
    slide_dimensions: tuple[int, int] | None = None
    min_tissue: float | None = None
    segmentation: dict[str, Any] | str | None = None
    source_format: str = "slidemil"
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def patch_size_level0(self) -> float:
        return self.patch_size * self.target_downsample

    def geometry(self) -> dict[str, Any]:
        """The :data:`PATCH_GEOMETRY_KEYS` of this patch set (``slide_dimensions`` as a list)."""
        values = {k: getattr(self, k) for k in PATCH_GEOMETRY_KEYS}
        values["slide_dimensions"] = list(self.slide_dimensions or ())
        return values

    @property
    def fingerprint(self) -> str:
        """Hash of the coordinates and the read geometry: two patch sets with the same
        fingerprint give the same pixels for every row."""
        return patch_fingerprint(self.coords, {k: getattr(self, k) for k in FINGERPRINT_GEOMETRY})


def patch_fingerprint(coords: np.ndarray, geometry: dict[str, Any]) -> str:
    """Hash of level-0 ``coords`` (N, 2) and the :data:`FINGERPRINT_GEOMETRY` values of
    ``geometry``; recorded in feature files so features of a re-patched slide count as stale."""
    digest = hashlib.sha256(np.ascontiguousarray(coords, dtype="<i8").reshape(-1, 2).tobytes())
    values = {k: geometry.get(k) for k in FINGERPRINT_GEOMETRY}
    # floats rounded: the downsample is a ratio of sizes and may differ in the last bit
    values = {k: round(float(v), 6) if v is not None else None for k, v in values.items()}
    digest.update(json.dumps(values, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def write_patch_file(path: str | Path, patches: PatchSet) -> Path:
    """Write ``patches`` atomically to ``path``."""
    path = Path(path)
    coords = np.asarray(patches.coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dataset = f.create_dataset("coords", data=coords)
        dataset.attrs["patch_level"] = int(patches.read_level)
        dataset.attrs["patch_size"] = int(patches.read_size)
        write_attrs(
            f.attrs,
            {
                "format_version": PATCH_FORMAT_VERSION,
                **provenance(),
                "slide_id": patches.slide_id,
                "slide_path": patches.slide_path,
                "patch_size": int(patches.patch_size),
                "patch_size_level0": float(patches.patch_size_level0),
                "step": int(patches.step if patches.step is not None else patches.patch_size),
                "read_level": int(patches.read_level),
                "read_size": int(patches.read_size),
                "target_downsample": float(patches.target_downsample),
                "target_mpp": patches.target_mpp,
                "magnification": patches.magnification,
                "slide_mpp": patches.slide_mpp,
                "slide_dimensions": list(patches.slide_dimensions or ()),
                "min_tissue": patches.min_tissue,
                "segmentation": patches.segmentation,
                "source_format": "slidemil",
                **patches.extra,
            },
        )
    return path


def read_patch_file(path: str | Path, slide: Slide | None = None) -> PatchSet:
    """Read a slidemil, CLAM or TRIDENT patch file. Raises :class:`ArtifactError` naming the
    file and problem.

    ``slide`` (optional) fills in what a CLAM or TRIDENT file does not record (level
    downsamples, read level, µm/px); slidemil files need nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "patch file not found")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ArtifactError(path, "no 'coords' dataset: not a patch file")
            version = read_attr(f.attrs, "format_version")
            if version is not None:
                return _read_slidemil(path, f, version)
    except ArtifactError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(path, f"unreadable or truncated patch file: {e}") from e
    # No format_version: a CLAM or TRIDENT file (imported here: that module imports this one).
    from slidemil.formats.foreign_patches import read_foreign_patch_file

    return read_foreign_patch_file(path, slide)


def _read_slidemil(path: Path, f: h5py.File, version: Any) -> PatchSet:
    if int(version) > PATCH_FORMAT_VERSION:
        raise ArtifactError(
            path,
            f"patch format {version} is newer than this slidemil reads ({PATCH_FORMAT_VERSION})",
            "upgrade slidemil",
        )
    coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
    a = f.attrs
    dims = read_attr(a, "slide_dimensions") or None
    known = {
        "format_version",
        "slidemil_version",
        "slide_id",
        "slide_path",
        "patch_size",
        "patch_size_level0",
        "step",
        "read_level",
        "read_size",
        "target_downsample",
        "target_mpp",
        "magnification",
        "slide_mpp",
        "slide_dimensions",
        "min_tissue",
        "segmentation",
        "source_format",
    }
    return PatchSet(
        coords=coords,
        patch_size=int(read_attr(a, "patch_size")),
        read_level=int(read_attr(a, "read_level")),
        read_size=int(read_attr(a, "read_size")),
        target_downsample=float(read_attr(a, "target_downsample")),
        slide_id=str(read_attr(a, "slide_id", "")),
        slide_path=read_attr(a, "slide_path"),
        step=read_attr(a, "step"),
        target_mpp=read_attr(a, "target_mpp"),
        magnification=read_attr(a, "magnification"),
        slide_mpp=read_attr(a, "slide_mpp"),
        slide_dimensions=tuple(dims) if dims else None,
        min_tissue=read_attr(a, "min_tissue"),
        segmentation=read_attr(a, "segmentation"),
        source_format=str(read_attr(a, "source_format", "slidemil")),
        extra={k: read_attr(a, k) for k in a if k not in known},
    )


def is_complete_patch_file(path: str | Path) -> bool:
    """True when ``path`` is a readable slidemil patch file (a truncated one is redone)."""
    try:
        patches = read_patch_file(path)
    except ArtifactError:
        return False
    return patches.source_format == "slidemil"
