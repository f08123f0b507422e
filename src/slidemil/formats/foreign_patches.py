"""Reading patch coordinate files written by CLAM and TRIDENT into a :class:`PatchSet`.

CLAM (``create_patches_fp.py``): dataset ``coords`` (N, 2) level-0 x, y with attributes
``patch_level`` (the level read) and ``patch_size`` (px read at that level, no resize); newer
versions add ``downsample`` (the level's [x, y] downsample), ``downsampled_level_dim`` and
``level_dim`` (both the [width, height] of the read level, not of level 0), ``name`` and
``save_path``.

TRIDENT (``<name>_patches.h5``): dataset ``coords`` (N, 2) level-0 x, y with attributes
``patch_size`` (px at the target magnification), ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap`` (px at the target
magnification), ``name``, ``savetodir``, ``level0_width`` and ``level0_height``; a missing value
is the string ``"None"``. TRIDENT feature files copy these attributes onto their own ``coords``,
so :func:`patch_set_from_attrs` places their patches too.

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


def find_patch_file(folder: str | Path, slide_id: str) -> Path | None:
    """A slide's patch file in ``folder`` or its ``patches/`` subfolder: ``<slide_id>.h5``
    (CLAM, slidemil) or ``<slide_id>_patches.h5`` (TRIDENT); None when there is none."""
    folder = Path(folder)
    for base in (folder, folder / "patches"):
        for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
            if (base / name).is_file():
                return base / name
    return None


def read_foreign_attr(attrs: h5py.AttributeManager, key: str) -> Any:
    """An attribute decoded like :func:`read_attr`, with TRIDENT's string ``"None"`` (how its
    ``save_h5`` stores a missing value) read as ``None``."""
    value = read_attr(attrs, key)
    return None if value == "None" else value


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
            attrs = {k: read_foreign_attr(f.attrs, k) for k in f.attrs}
            attrs.update({k: read_foreign_attr(f["coords"].attrs, k) for k in f["coords"].attrs})
    except ArtifactError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(path, f"unreadable or truncated patch file: {e}") from e
    return patch_set_from_attrs(path, coords, attrs, slide)


def patch_set_from_attrs(
    path: Path, coords: np.ndarray, attrs: dict[str, Any], slide: Slide | None = None
) -> PatchSet:
    """A :class:`PatchSet` from CLAM's or TRIDENT's ``coords`` attributes, wherever they sit: in
    a patch file, or copied into a TRIDENT feature file. ``path`` names the file in errors."""
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
    dims = attrs.get("level_dim")  # of the read level: level-0 size is dims x downsample
    if isinstance(dims, list | tuple) and len(dims) == 2:
        scale = attrs.get("downsample")
        scale = scale if isinstance(scale, list | tuple) and len(scale) == 2 else [downsample] * 2
        dims = [round(float(n) * float(s)) for n, s in zip(dims, scale, strict=True)]
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
        slide_dimensions=_dimensions(
            [attrs.get("level0_width"), attrs.get("level0_height")], slide
        ),
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
    """Level-0 [width, height]: the slide's own when it is open, else what the file says."""
    if slide is not None:
        return tuple(slide.dimensions)
    if isinstance(dims, list | tuple) and len(dims) == 2 and None not in dims:
        return int(dims[0]), int(dims[1])
    return None


def _slide_mpp(slide: Slide | None) -> float | None:
    return None if slide is None else slide.mpp_or_none
