"""One slide's bag for prediction: its features, coordinates and patch geometry, checked.

slidemil feature files carry the patch geometry in their attributes; CLAM and TRIDENT files are
placed by their ``coords`` attributes, as their patch files would be (with the slide's help when
a CLAM file lacks the level downsample).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import ArtifactError, ConfigError, NoTissueError
from slidemil.formats.feature_file import read_feature_attrs, read_feature_file
from slidemil.formats.patch_file import read_patch_file

# Patch-file geometry every attention file carries, so heat maps need nothing else.
GEOMETRY_KEYS = (
    "patch_size", "patch_size_level0", "read_level", "read_size", "target_downsample", "step",
    "target_mpp", "magnification", "slide_mpp", "slide_dimensions",
)  # fmt: skip


@dataclass
class SlideBag:
    """One slide's features (stored dtype), level-0 patch coordinates and patch geometry."""

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
) -> SlideBag:
    """Read and check a bag: the model's feature size, the recorded encoder, at least one patch,
    and a patch geometry (a slidemil file's attributes, or a CLAM / TRIDENT file's read with the
    slide's help when the file lacks level downsamples)."""
    attrs = read_feature_attrs(path)
    native = attrs.get("format_version") is not None
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
    if len(bag) == 0:
        raise NoTissueError(path, "the slide has no patches", "check its tissue preview")
    if native and bag.attrs.get("patch_size_level0") is not None:
        geometry = {k: bag.attrs.get(k) for k in GEOMETRY_KEYS}
    else:
        geometry = _foreign_geometry(path, slide_path, slide_mpp)
    if slide_mpp is not None:  # the cohort's override, as patching used it
        geometry["slide_mpp"] = slide_mpp
    return SlideBag(bag.features, bag.coords, geometry, encoder, weights)


def _foreign_geometry(path: Path, slide_path: Path | None, slide_mpp: float | None) -> dict:
    """A CLAM or TRIDENT file's geometry, read like its patch file (its ``coords`` carry it)."""
    from slidemil.slide import Slide

    try:
        if slide_path is not None and Path(slide_path).exists():
            with Slide(slide_path, mpp_override=slide_mpp) as slide:
                patches = read_patch_file(path, slide)
        else:
            patches = read_patch_file(path)
    except ArtifactError as e:
        raise ArtifactError(
            path,
            f"cannot place its patches on the slide: {e.problem}",
            "give feature files that record patch_size_level0 (slidemil, TRIDENT) or CLAM's "
            "patch_level and patch_size",
        ) from e
    geometry = {k: getattr(patches, k, None) for k in GEOMETRY_KEYS}
    geometry["slide_dimensions"] = list(patches.slide_dimensions or ())
    return geometry
