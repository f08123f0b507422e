"""The stain normaliser: fitted on a target image, applied to batches, saved as a JSON state."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slidemil.errors import ConfigError
from slidemil.stain.macenko import (
    WEAK_SEPARATION_DEGREES,
    MacenkoStains,
    WeakStainSeparationWarning,
    apply_macenko,
    fit_macenko,
)
from slidemil.stain.optical_density import MIN_TISSUE_FRACTION
from slidemil.stain.reinhard import ReinhardStatistics, apply_reinhard, fit_reinhard
from slidemil.stain.target import TARGET_FIX, read_target_image

if TYPE_CHECKING:
    import torch

StainMethod = Literal["macenko", "reinhard"]
STAIN_METHODS: tuple[str, ...] = ("macenko", "reinhard")
STATE_VERSION = 1
PATCHES_PER_CHUNK = 64  # bounds the float32 temporaries (~20 × 4 bytes per pixel)

_FITTERS: dict[str, Callable[[Any], Any]] = {"macenko": fit_macenko, "reinhard": fit_reinhard}
_PARAMETERS: dict[str, type] = {"macenko": MacenkoStains, "reinhard": ReinhardStatistics}


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted stain normaliser; call it on a (B, 3, H, W) uint8 batch on any device.

    ``parameters`` are the target's stains (:class:`~slidemil.stain.macenko.MacenkoStains`) or
    colour statistics (:class:`~slidemil.stain.reinhard.ReinhardStatistics`); ``target_name`` and
    ``target_sha256`` identify the image they were fitted on. Patches with a smaller fraction
    of tissue pixels than ``min_tissue_fraction`` (0–1) come back unchanged.
    """

    method: StainMethod
    parameters: MacenkoStains | ReinhardStatistics
    target_name: str
    target_sha256: str
    min_tissue_fraction: float = MIN_TISSUE_FRACTION

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised copy of ``images`` (B, 3, H, W) uint8, on the same device."""
        import torch

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"stain normalisation takes (B, 3, H, W) uint8 images, got {tuple(images.shape)} "
                f"{images.dtype}"
            )
        if images.shape[0] == 0:
            return images.clone()
        apply = apply_macenko if self.method == "macenko" else apply_reinhard
        # one memory layout, so channels-last batches get bit-identical results
        chunks = [
            apply(chunk.contiguous(), self.parameters, self.min_tissue_fraction)  # type: ignore[arg-type]
            for chunk in images.split(PATCHES_PER_CHUNK)
        ]
        return torch.cat(chunks)

    def to_state(self) -> dict[str, Any]:
        """A JSON-able record that :meth:`from_state` turns back into this normaliser."""
        return {
            "format_version": STATE_VERSION,
            "method": self.method,
            "parameters": self.parameters.to_dict(),
            "min_tissue_fraction": self.min_tissue_fraction,
            "target": {"name": self.target_name, "sha256": self.target_sha256},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str | Path | None = None) -> StainNormalizer:
        """The normaliser a :meth:`to_state` record describes (no target file needed).

        ``source`` names the file the state was read from, for the error a bad state raises
        (:class:`~slidemil.errors.ConfigError`).
        """
        if not isinstance(state, dict):
            raise ConfigError(source, f"stain normalisation state is not a mapping: {state!r}")
        version = state.get("format_version")
        if version != STATE_VERSION:
            raise ConfigError(
                source,
                f"stain normalisation state has format_version {version!r}; this slidemil reads "
                f"{STATE_VERSION}",
                "upgrade slidemil or redo the extraction",
            )
        method = state.get("method")
        if method not in STAIN_METHODS:
            raise ConfigError(source, f"unknown stain normalisation method {method!r}")
        try:
            parameters = _PARAMETERS[method].from_dict(state["parameters"])  # type: ignore[attr-defined]
            target = state["target"]
            return cls(
                method=method,
                parameters=parameters,
                target_name=str(target["name"]),
                target_sha256=str(target["sha256"]),
                min_tissue_fraction=float(state["min_tissue_fraction"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(source, f"stain normalisation state is incomplete ({e!r})") from e


def fit_stain_normalizer(
    method: StainMethod, target: str | Path, min_tissue_fraction: float = MIN_TISSUE_FRACTION
) -> StainNormalizer:
    """Fit ``method`` (``macenko`` or ``reinhard``) on the RGB image at ``target``.

    Raises :class:`~slidemil.errors.ConfigError` naming the file when the target is missing, not
    an RGB image, has no tissue, or (Macenko) shows only one stain; warns
    (:class:`~slidemil.stain.macenko.WeakStainSeparationWarning`) when its two Macenko stain
    vectors are under 12 degrees apart.
    """
    from slidemil.encoders.weights import file_sha256

    if method not in STAIN_METHODS:
        raise ConfigError(
            None, f"unknown stain normalisation method {method!r}; choose one of {STAIN_METHODS}"
        )
    image = read_target_image(target, min_tissue_fraction)
    try:
        parameters = _FITTERS[method](image)
    except (ValueError, RuntimeError, IndexError) as e:
        raise ConfigError(
            target, f"stain target cannot be fitted with {method}: {e}", TARGET_FIX
        ) from e
    if isinstance(parameters, MacenkoStains):
        angle = parameters.separation_degrees()
        if angle < WEAK_SEPARATION_DEGREES:
            warnings.warn(
                f"{target}: the stain target's haematoxylin and eosin vectors are only "
                f"{angle:.1f} degrees apart, so normalised patches lose most of the contrast "
                "between the two stains (pick a target with both nuclei and eosin-stained "
                "stroma or cytoplasm)",
                WeakStainSeparationWarning,
                stacklevel=2,
            )
    return StainNormalizer(
        method=method,
        parameters=parameters,
        target_name=Path(target).name,
        target_sha256=file_sha256(target),
        min_tissue_fraction=min_tissue_fraction,
    )
