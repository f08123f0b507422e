"""One slide's bag for prediction: its features, coordinates and, where known, patch geometry.

A prediction needs only the features, so any bag predicts: slidemil's, CLAM's (``h5_files`` or
``pt_files``) and TRIDENT's. Only a heat map needs to know where each patch sits and how large it
is, and that comes from the first of:

1. the feature file itself: slidemil's attributes, or the ``coords`` attributes TRIDENT copies
   from its patch file;
2. the slide's patch file in ``GeometryHints.patches`` (CLAM ``patches/<slide>.h5``, TRIDENT
   ``patches/<slide>_patches.h5`` or slidemil's own), whose coordinates must be the bag's;
3. an explicit footprint, ``GeometryHints.patch_size_level0`` (level-0 px), for bags with
   coordinates (CLAM ``h5_files``).

Without any, the geometry records why (``geometry_problem``): the prediction is made and the heat
map of that slide fails with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import ArtifactError, ConfigError, NoTissueError, SlidemilError
from slidemil.formats.feature_file import read_feature_attrs, read_feature_file
from slidemil.formats.foreign_patches import find_patch_file, foreign_format, patch_set_from_attrs
from slidemil.formats.patch_file import PATCH_GEOMETRY_KEYS, PatchSet, read_patch_file
from slidemil.stain.describe import describe_stain_state, same_stain_state


@dataclass(frozen=True)
class GeometryHints:
    """Where to find the patch geometry a feature file does not record (CLAM's files).

    ``patches``: folder of the slides' patch files (CLAM's ``--save_dir`` or its ``patches/``,
    TRIDENT's job folder for one patching setting or its ``patches/``, or a slidemil work
    folder's ``patches/``). ``patch_size_level0``: the patch footprint in level-0 px, for every
    bag that has coordinates but no geometry.
    """

    patches: Path | None = None
    patch_size_level0: float | None = None


@dataclass
class SlideBag:
    """One slide's features (stored dtype), level-0 patch coordinates and patch geometry.

    ``geometry`` holds :data:`PATCH_GEOMETRY_KEYS` (None where unknown) and ``has_coords``,
    ``geometry_source`` and ``geometry_problem`` (None, or why no heat map can be drawn).
    """

    features: np.ndarray  # (N, D)
    coords: np.ndarray  # int64 (N, 2)
    geometry: dict[str, Any]
    encoder: str | None = None
    weights: str | None = None


def read_slide_bag(
    path: Path,
    slide_path: Path | None,
    slide_mpp: float | None,
    *,
    feature_dim: int,
    identity: dict[str, Any] | None,
    hints: GeometryHints | None = None,
) -> SlideBag:
    """Read and check a bag: the model's feature size, the recorded encoder and stain
    normalisation, at least one patch; then find its patch geometry (see the module docstring).
    A missing geometry never fails the bag: it is recorded in ``geometry["geometry_problem"]``."""
    native = path.suffix == ".h5" and read_feature_attrs(path).get("format_version") is not None
    # slidemil files keep their stored dtype (float16 halves memory on a 200k-patch slide)
    bag = read_feature_file(path, dtype=None if native else np.float32)
    if bag.dim != feature_dim:
        raise ArtifactError(
            path, f"{bag.dim}-d features but the model takes {feature_dim}-d",
            "use features of the encoder the run was trained on",
        )  # fmt: skip
    encoder, weights = bag.attrs.get("encoder"), bag.attrs.get("weights")
    if identity and encoder and weights:
        expected = (identity.get("encoder"), identity.get("weights_identity"))
        if expected[0] and (encoder, weights) != expected:
            raise ConfigError(
                path,
                f"features of {encoder} ({weights}); the model was trained on "
                f"{expected[0]} ({expected[1]})",
                "extract with the run's encoder and weights",
            )
    if identity is not None:
        _check_stain_normalization(path, bag.attrs.get("stain_normalization"), identity)
    if len(bag) == 0:
        raise NoTissueError(path, "the slide has no patches", "check its tissue preview")
    has_coords = bool(bag.attrs.get("has_coords", True))
    coords, geometry = _place(path, bag, has_coords, native, slide_path, slide_mpp, hints)
    if slide_mpp is not None:
        geometry["slide_mpp"] = slide_mpp  # the cohort's override, as patching used it
    return SlideBag(bag.features, coords, geometry, encoder, weights)


def _check_stain_normalization(path: Path, found: Any, identity: dict[str, Any]) -> None:
    """The bag must be stain-normalised as the training features were (a file that records no
    normalisation, such as CLAM's or TRIDENT's, was not normalised)."""
    expected = identity.get("stain_normalization")
    if not same_stain_state(expected, found):
        raise ConfigError(
            path,
            f"features made with {describe_stain_state(found)}; the model was trained on "
            f"features made with {describe_stain_state(expected)}",
            "predict from the slides (the run's stain normalisation is applied) or extract "
            "with the same --stain-norm and --stain-target",
        )


def _place(
    path: Path,
    bag: Any,
    has_coords: bool,
    native: bool,
    slide_path: Path | None,
    slide_mpp: float | None,
    hints: GeometryHints | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The bag's coordinates and geometry, from the first source that has them."""
    hints = hints or GeometryHints()
    if native and bag.attrs.get("patch_size_level0") is not None:
        geometry = {k: bag.attrs.get(k) for k in PATCH_GEOMETRY_KEYS}
        return bag.coords, _with_source(geometry, "feature file")
    problems = []
    own = not native and has_coords and foreign_format(bag.attrs) is not None
    if own or hints.patches is not None:
        slide = _open_slide(slide_path, slide_mpp)
        try:
            if own:  # TRIDENT copies its patch file's attributes onto the feature file's coords
                try:
                    patches = patch_set_from_attrs(path, bag.coords, bag.attrs, slide)
                    return bag.coords, _geometry_of(patches, "feature file")
                except ArtifactError as e:
                    problems.append(e.problem)
            if hints.patches is not None:
                found = _from_patch_file(hints.patches, path.stem, bag.coords, has_coords, slide)
                if isinstance(found, str):
                    problems.append(found)
                else:
                    return found.coords, _geometry_of(found, f"patch file {found.extra['file']}")
        finally:
            if slide is not None:
                slide.close()
    if hints.patch_size_level0 is not None and has_coords:
        geometry = {k: None for k in PATCH_GEOMETRY_KEYS}
        geometry["patch_size_level0"] = float(hints.patch_size_level0)
        return bag.coords, _with_source(geometry, "patch_size_level0 option")
    if not has_coords:
        problems.append("the feature file has no patch coordinates (a .pt bag)")
    elif not problems:
        problems.append("the feature file records no patch size (patch_size_level0)")
    return bag.coords, {
        **{k: None for k in PATCH_GEOMETRY_KEYS},
        "has_coords": has_coords,
        "geometry_source": None,
        "geometry_problem": "; ".join(problems),
    }


def _from_patch_file(
    folder: Path, slide_id: str, coords: np.ndarray, has_coords: bool, slide: Any
) -> PatchSet | str:
    """The slide's patch file in ``folder`` when its coordinates are the bag's rows, else why
    not (a problem string)."""
    file = find_patch_file(folder, slide_id)
    if file is None:
        return f"no patch file {slide_id}.h5 or {slide_id}_patches.h5 in {folder}"
    try:
        patches = read_patch_file(file, slide)
    except ArtifactError as e:
        return str(e)
    if len(patches) != len(coords):
        return f"patch file {file} has {len(patches)} patches but the bag {len(coords)} rows"
    if has_coords and not np.array_equal(patches.coords, coords):
        return f"patch file {file} lists other coordinates than the feature file"
    patches.extra["file"] = str(file)
    return patches


def _open_slide(slide_path: Path | None, slide_mpp: float | None) -> Any:
    """The slide, to fill in what a CLAM or TRIDENT file does not record; None when it is not
    there or does not open (the prediction does not need it)."""
    from slidemil.slide import Slide

    if slide_path is None or not Path(slide_path).is_file():
        return None
    try:
        return Slide(slide_path, mpp_override=slide_mpp)
    except SlidemilError:
        return None


def _geometry_of(patches: PatchSet, source: str) -> dict[str, Any]:
    return _with_source(patches.geometry(), source)


def _with_source(geometry: dict[str, Any], source: str) -> dict[str, Any]:
    return {**geometry, "has_coords": True, "geometry_source": source, "geometry_problem": None}
