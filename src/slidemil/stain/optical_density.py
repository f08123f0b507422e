"""Optical density (Beer–Lambert) of RGB pixels, and which pixels are tissue or fully stained.

A *tissue* pixel absorbs at least ``beta`` OD in some channel (pale eosin stroma counts, glass
does not); both methods return a patch with too little tissue unchanged instead of forcing
background onto the target's colours. A *stained* pixel absorbs ``beta`` in every channel:
Macenko fits stain vectors on those only, as in the original method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Transmitted light intensity Io and the transparency threshold beta (in OD units) of Macenko et
# al. (ISBI 2009), as torchstain and HistomicsTK use them.
LIGHT_INTENSITY = 240.0
TRANSPARENCY_OD = 0.15
# A patch with a smaller fraction of tissue pixels, or fewer of them, is left as it is.
MIN_TISSUE_FRACTION = 0.05
MIN_TISSUE_PIXELS = 16


def optical_density(pixels: torch.Tensor, light_intensity: float = LIGHT_INTENSITY) -> torch.Tensor:
    """OD ``-log((I + 1) / Io)`` of uint8 or float RGB values in 0–255 (any shape), as float32."""
    import torch

    if pixels.dtype == torch.uint8:  # a 256-entry table: one gather instead of four passes
        levels = torch.arange(256, dtype=torch.float32, device=pixels.device)
        return (-torch.log((levels + 1.0) / light_intensity))[pixels.long()]
    return -torch.log((pixels.float() + 1.0) / light_intensity)


def stained_mask(od: torch.Tensor, beta: float = TRANSPARENCY_OD) -> torch.Tensor:
    """True where a pixel's OD reaches ``beta`` in every channel; ``od`` is (..., 3)."""
    return (od >= beta).all(dim=-1)


def tissue_mask(od: torch.Tensor, beta: float = TRANSPARENCY_OD) -> torch.Tensor:
    """True where a pixel's OD reaches ``beta`` in at least one channel; ``od`` is (..., 3)."""
    return (od >= beta).any(dim=-1)


def tissue_fraction(
    images: torch.Tensor, light_intensity: float = LIGHT_INTENSITY, beta: float = TRANSPARENCY_OD
) -> torch.Tensor:
    """Fraction (0–1) of tissue pixels of each image of a (B, 3, H, W) batch, shape (B,)."""
    od = optical_density(images.flatten(2).transpose(1, 2), light_intensity)
    return tissue_mask(od, beta).float().mean(dim=1)


def enough_tissue(od: torch.Tensor, min_tissue_fraction: float, beta: float = TRANSPARENCY_OD):
    """(B,) True where a patch's OD (B, P, 3) has at least ``min_tissue_fraction`` (0–1) and
    ``MIN_TISSUE_PIXELS`` tissue pixels: the patches worth normalising."""
    count = tissue_mask(od, beta).sum(dim=1)
    return count >= max(min_tissue_fraction * od.shape[1], MIN_TISSUE_PIXELS)
