"""Reinhard colour transfer (Reinhard et al., IEEE CG&A 2001), batched over patches.

Each patch's L*a*b* channels are standardised to zero mean and unit standard deviation over the
patch's tissue pixels and rescaled to the target's mean and standard deviation (fitted with
torchstain on the target's tissue pixels; applied here batched, the same formulas as
torchstain's per-image ``normalize``, which on a patch of tissue only gives the same result).
Statistics come from tissue pixels only and background pixels keep their colour, as
HistomicsTK's ``mask_out`` does: otherwise a patch that is half glass would have its glass
tinted and its tissue standardised against white. A patch with a smaller fraction of tissue
pixels than ``min_tissue_fraction`` (or fewer than 16), or with a flat channel (standard
deviation ~0), is returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slidemil.stain.lab import lab_to_rgb, rgb_to_lab
from slidemil.stain.optical_density import enough_tissue, optical_density, tissue_mask

if TYPE_CHECKING:
    import torch

MIN_CHANNEL_STD = 1e-3  # L*a*b* units; a flatter channel cannot be rescaled


@dataclass(frozen=True)
class ReinhardStatistics:
    """The target's mean and standard deviation of L* (0–100), a* and b*."""

    means: tuple[float, float, float]
    stds: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"means": list(self.means), "stds": list(self.stds)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReinhardStatistics:
        means = tuple(float(v) for v in values["means"])
        stds = tuple(float(v) for v in values["stds"])
        if len(means) != 3 or len(stds) != 3:
            raise ValueError("means and stds must have 3 values (L*, a*, b*)")
        return cls(means=(means[0], means[1], means[2]), stds=(stds[0], stds[1], stds[2]))


def fit_reinhard(image: torch.Tensor) -> ReinhardStatistics:
    """Fit the L*a*b* statistics of the tissue pixels of one (3, H, W) uint8 RGB image with
    torchstain (glass would pull the means towards white)."""
    import torch
    from torchstain.torch.normalizers import TorchReinhardNormalizer

    pixels = image.reshape(3, -1)
    tissue = tissue_mask(optical_density(pixels.T))
    fitter = TorchReinhardNormalizer()
    fitter.fit(pixels[:, tissue][:, None, :])  # the tissue pixels as a (3, 1, N) image
    means = fitter.target_means.float()
    stds = fitter.target_stds.float()
    if not (torch.isfinite(means).all() and torch.isfinite(stds).all()):
        raise ValueError("its colour statistics are not finite")
    if bool((stds < MIN_CHANNEL_STD).any()):
        raise ValueError("its tissue is a flat colour")
    m, s = means.tolist(), stds.tolist()
    return ReinhardStatistics(means=(m[0], m[1], m[2]), stds=(s[0], s[1], s[2]))


def apply_reinhard(
    images: torch.Tensor, statistics: ReinhardStatistics, min_tissue_fraction: float
) -> torch.Tensor:
    """Normalise a (B, 3, H, W) uint8 batch to ``statistics``; same shape, dtype and device."""
    import torch

    batch, channels, height, width = images.shape
    device = images.device
    target_means = torch.tensor(statistics.means, device=device)[None, :, None]
    target_stds = torch.tensor(statistics.stds, device=device)[None, :, None]
    od = optical_density(images.reshape(batch, channels, -1).transpose(1, 2))  # (B, P, 3)
    tissue = tissue_mask(od)[:, None, :]  # (B, 1, P)
    lab = rgb_to_lab(images).reshape(batch, channels, -1)  # (B, 3, P)
    # mean and (unbiased) standard deviation over each patch's tissue pixels only
    weights = tissue.float()
    n = weights.sum(dim=2, keepdim=True)
    means = (lab * weights).sum(dim=2, keepdim=True) / n.clamp_min(1)
    variance = ((lab - means) ** 2 * weights).sum(dim=2, keepdim=True) / (n - 1).clamp_min(1)
    stds = variance.sqrt()
    flat_channel = ~(stds >= MIN_CHANNEL_STD)  # NaN counts as flat
    flat = flat_channel.flatten(1).any(dim=1)
    standardised = (lab - means) / torch.where(flat_channel, 1.0, stds)
    mapped = (standardised * target_stds + target_means).reshape(batch, channels, height, width)
    normalised = (lab_to_rgb(mapped) * 255.0).to(torch.uint8)
    # background keeps its colour (as HistomicsTK's mask_out): glass is not the stain
    normalised = torch.where(tissue.reshape(batch, 1, height, width), normalised, images)
    keep = flat | ~enough_tissue(od, min_tissue_fraction)
    return torch.where(keep[:, None, None, None], images, normalised)
