"""Reading patch coordinate files written by CLAM and TRIDENT into a :class:`PatchSet`.

CLAM (``create_patches_fp.py``): dataset ``coords`` (N, 2) level-0 x, y with attributes
``patch_level`` (the level read) and ``patch_size`` (px read at that level, no resize); newer
versions add ``downsample`` (the level's [x, y] downsample), ``downsampled_level_dim``,
``level_dim`` (level-0 [width, height]), ``name`` and ``save_path``.

TRIDENT (``<name>_patches.h5``): dataset ``coords`` (N, 2) level-0 x, y with attributes
``patch_size`` (px at the target magnification), ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap`` (px at the target
magnification) and ``name``.

What a file lacks (the level downsample of an old CLAM file, the read level of a TRIDENT file,
the slide's µm/px) comes from the slide when one is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from slidemil.errors import ArtifactError
from slidemil.formats.h5 import read_attr
from slidemil.formats.patch_file import PatchSet

if TYPE_CHECKING:
    from slidemil.slide import Slide

CLAM_KEYS = ("patch_level",)
TRIDENT_KEYS = ("patch_size_level0", "target_magnification", "level0_magnification")


def foreign_format(attrs: dict[str, Any]) -> str | None:
    """``"clam"``, ``"trident"`` or ``None`` from the merged ``coords`` and root attributes."""
    if any(key in attrs for key in TRIDENT_KEYS):
        return "trident"
    if any(key in attrs for key in CLAM_KEYS):
        return "clam"
    return None


def read_foreign_patch_file(path: str | Path, slide: Slide | None = None) -> PatchSet:
    """Read a CLAM or TRIDENT patch file; ``slide`` fills in what the file does not record."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "patch file not found")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ArtifactError(path, "no 'coords' dataset: not a patch file")
            coords = np.asarray(f["coords"][:]).reshape(-1, 2).astype(np.int64)
            attrs = {k: read_attr(f.attrs, k) for k in f.attrs}
            attrs.update({k: read_attr(f["coords"].attrs, k) for k in f["coords"].attrs})
    except ArtifactError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(path, f"unreadable or truncated patch file: {e}") from e
    kind = foreign_format(attrs)
    if kind == "clam":
        return _from_clam(path, coords, attrs, slide)
    if kind == "trident":
        return _from_trident(path, coords, attrs, slide)
    raise ArtifactError(
        path,
        "neither a slidemil, CLAM nor TRIDENT patch file (no format_version, patch_level or "
        "patch_size_level0 attribute)",
    )


def _from_clam(path: Path, coords, attrs, slide: Slide | None) -> PatchSet:
    level = int(_need(path, attrs, "patch_level"))
    size = int(_need(path, attrs, "patch_size"))
    downsample = _first(attrs.get("downsample"))
    if downsample is None and slide is not None:
        downsample = slide.level_downsamples[level]
    if downsample is None:
        if level != 0:
            raise ArtifactError(
                path,
                f"CLAM file reads level {level} but does not record its downsample",
                "pass the slide so its level downsamples can be used",
            )
        downsample = 1.0
    dims = attrs.get("level_dim")
    slide_mpp = _slide_mpp(slide)
    return PatchSet(
        coords=coords,
        patch_size=size,
        read_level=level,
        read_size=size,
        target_downsample=float(downsample),
        slide_id=str(attrs.get("name") or path.stem),
        slide_path=None if slide is None else str(slide.path),
        step=None,
        target_mpp=None if slide_mpp is None else slide_mpp * float(downsample),
        slide_mpp=slide_mpp,
        slide_dimensions=_dimensions(dims, slide),
        source_format="clam",
        extra={"source_file": str(path)},
    )


def _from_trident(path: Path, coords, attrs, slide: Slide | None) -> PatchSet:
    size = int(_need(path, attrs, "patch_size"))
    size_level0 = attrs.get("patch_size_level0")
    level0_mag = attrs.get("level0_magnification")
    target_mag = attrs.get("target_magnification")
    if size_level0 is not None:
        downsample = float(size_level0) / size
    elif level0_mag and target_mag:
        downsample = float(level0_mag) / float(target_mag)
    else:
        raise ArtifactError(
            path, "TRIDENT file records neither patch_size_level0 nor the magnifications"
        )
    if slide is not None:
        plan = slide.plan_for_downsample(downsample)
        read_level, read_size = plan.level, math.ceil(size * plan.scale - 1e-9)
    else:  # level 0 always works; a slide allows a cheaper level
        read_level, read_size = 0, math.ceil(downsample * size - 1e-9)
    overlap = int(attrs.get("overlap") or 0)
    slide_mpp = _slide_mpp(slide)
    name = str(attrs.get("name") or path.stem.removesuffix("_patches"))
    return PatchSet(
        coords=coords,
        patch_size=size,
        read_level=read_level,
        read_size=read_size,
        target_downsample=downsample,
        slide_id=name,
        slide_path=None if slide is None else str(slide.path),
        step=size - overlap,
        target_mpp=None if slide_mpp is None else slide_mpp * downsample,
        magnification=None if target_mag is None else float(target_mag),
        slide_mpp=slide_mpp,
        slide_dimensions=_dimensions(None, slide),
        source_format="trident",
        extra={"source_file": str(path), "level0_magnification": level0_mag},
    )


def _need(path: Path, attrs: dict[str, Any], key: str) -> Any:
    if attrs.get(key) is None:
        raise ArtifactError(path, f"patch file lacks the {key!r} attribute")
    return attrs[key]


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return float(value[0]) if value else None
    return float(value)


def _dimensions(dims: Any, slide: Slide | None) -> tuple[int, int] | None:
    if isinstance(dims, list | tuple) and len(dims) == 2:
        return int(dims[0]), int(dims[1])
    return None if slide is None else tuple(slide.dimensions)


def _slide_mpp(slide: Slide | None) -> float | None:
    return None if slide is None else slide.mpp_or_none
