"""Macenko stain normalisation (Macenko et al., ISBI 2009), batched over patches on any device.

The target's stain matrix and concentration maxima are fitted with torchstain (one image). Applying
them is our own batched code, the same algorithm as torchstain's per-image ``normalize``: per
patch, the optical density (OD) of its stained pixels spans a plane (the two largest eigenvectors
of their covariance); the extreme angles (``alpha`` and ``100 - alpha`` percentiles) in that plane
give the patch's haematoxylin and eosin vectors; each pixel's stain concentrations are solved
against them, rescaled so their 99th percentiles match the target's, and recomposed with the
target's stain vectors.

Degenerate patches never give NaN:
- a smaller fraction of tissue pixels than ``min_tissue_fraction`` (background, glass), or fewer
  than 16: returned unchanged;
- stain vectors that cannot be estimated (fewer than 1% of the pixels stained in every channel,
  as in pale eosin-only stroma; one stain seen twice; non-finite eigenvectors): the target's stain
  vectors stand in for the patch's own, so only the concentrations are rescaled;
- a stain absent from the patch (99th-percentile concentration under 0.05 OD): not rescaled, so
  noise is never amplified into colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slidemil.stain.optical_density import (
    LIGHT_INTENSITY,
    TRANSPARENCY_OD,
    enough_tissue,
    optical_density,
    stained_mask,
)

if TYPE_CHECKING:
    import torch

ANGLE_PERCENTILE = 1.0  # alpha: robust extremes of the stain angles, in percent
CONCENTRATION_PERCENTILE = 99.0  # the "maximum" concentration of each stain, in percent
# Two unit stain vectors closer than this cosine (~5.7 degrees) are one stain seen twice.
MAX_STAIN_COSINE = 0.995
MIN_CONCENTRATION = 0.05  # OD; a stain whose 99th percentile is lower is absent: not rescaled
MIN_STAINED_FRACTION = 0.01  # of a patch's pixels, to estimate its own stain vectors


# Fitted H and E vectors closer than this (degrees) keep little of the contrast between stains.
WEAK_SEPARATION_DEGREES = 12.0


class WeakStainSeparationWarning(UserWarning):
    """The target's haematoxylin and eosin vectors are so close that normalised patches lose most
    of the contrast between the two stains."""


@dataclass(frozen=True)
class MacenkoStains:
    """The target's stains: ``stain_matrix`` (3 × 2, OD per RGB channel of haematoxylin, then
    eosin), ``max_concentrations`` (2,), and the light intensity and thresholds they were fitted
    with (``light_intensity`` 0–255, ``alpha`` percent, ``beta`` OD)."""

    stain_matrix: tuple[tuple[float, float], ...]
    max_concentrations: tuple[float, float]
    light_intensity: float = LIGHT_INTENSITY
    alpha: float = ANGLE_PERCENTILE
    beta: float = TRANSPARENCY_OD

    def separation_degrees(self) -> float:
        """The angle between the haematoxylin and eosin vectors, in degrees."""
        h, e = zip(*self.stain_matrix, strict=True)
        dot = sum(a * b for a, b in zip(h, e, strict=True))
        norms = math.sqrt(sum(a * a for a in h) * sum(b * b for b in e))
        return math.degrees(math.acos(max(-1.0, min(1.0, dot / norms))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stain_matrix": [list(row) for row in self.stain_matrix],
            "max_concentrations": list(self.max_concentrations),
            "light_intensity": self.light_intensity,
            "alpha": self.alpha,
            "beta": self.beta,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MacenkoStains:
        matrix = tuple(tuple(float(v) for v in row) for row in values["stain_matrix"])
        maxima = tuple(float(v) for v in values["max_concentrations"])
        if len(matrix) != 3 or any(len(row) != 2 for row in matrix) or len(maxima) != 2:
            raise ValueError("stain_matrix must be 3 × 2 and max_concentrations 2 values")
        return cls(
            stain_matrix=matrix,
            max_concentrations=(maxima[0], maxima[1]),
            light_intensity=float(values["light_intensity"]),
            alpha=float(values["alpha"]),
            beta=float(values["beta"]),
        )


def fit_macenko(image: torch.Tensor) -> MacenkoStains:
    """Fit the stains of one (3, H, W) uint8 RGB image with torchstain.

    Raises ``ValueError`` when the image's stains cannot be separated (the caller names the file).
    """
    import torch
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    od = optical_density(image.reshape(3, -1).T)
    stained = int(stained_mask(od).sum())
    if stained < max(100, MIN_STAINED_FRACTION * od.shape[0]):
        raise ValueError(f"only {stained} of its pixels are stained enough to fit stain vectors")
    fitter = TorchMacenkoNormalizer()
    fitter.fit(image, Io=LIGHT_INTENSITY, alpha=ANGLE_PERCENTILE, beta=TRANSPARENCY_OD)
    matrix = fitter.HERef.float()
    maxima = fitter.maxCRef.float()
    if not (torch.isfinite(matrix).all() and torch.isfinite(maxima).all()):
        raise ValueError("its stain vectors could not be estimated")
    if _cosine(matrix[:, 0], matrix[:, 1]) > MAX_STAIN_COSINE:
        raise ValueError("it shows only one stain (haematoxylin and eosin vectors coincide)")
    if bool((maxima < MIN_CONCENTRATION).any()):
        raise ValueError("one of its stains is absent")
    rows = matrix.tolist()
    return MacenkoStains(
        stain_matrix=tuple((row[0], row[1]) for row in rows),
        max_concentrations=(float(maxima[0]), float(maxima[1])),
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-12))


def _nearest_rank(values: torch.Tensor, percent: float, counts: torch.Tensor) -> torch.Tensor:
    """torchstain's percentile (nearest rank, ``1 + round(q / 100 * (n - 1))``) of the first
    ``counts[b]`` values of each sorted row of ``values`` (B, P), shape (B,)."""
    import torch

    ranks = torch.round(0.01 * percent * (counts.double() - 1)).long()
    ranks = ranks.clamp(0, values.shape[1] - 1)
    return values.gather(1, ranks[:, None])[:, 0]


def apply_macenko(
    images: torch.Tensor, stains: MacenkoStains, min_tissue_fraction: float
) -> torch.Tensor:
    """Normalise a (B, 3, H, W) uint8 batch to ``stains``; same shape, dtype and device."""
    import torch

    batch, channels, height, width = images.shape
    pixels = height * width
    device = images.device
    target_matrix = torch.tensor(stains.stain_matrix, dtype=torch.float32, device=device)
    target_maxima = torch.tensor(stains.max_concentrations, dtype=torch.float32, device=device)

    od = optical_density(
        images.reshape(batch, channels, pixels).transpose(1, 2), stains.light_intensity
    )
    worth_it = enough_tissue(od, min_tissue_fraction, stains.beta)
    stained = stained_mask(od, stains.beta)  # (B, P)
    counts = stained.sum(dim=1)
    estimable = counts >= max(MIN_STAINED_FRACTION * pixels, 3.0)

    # covariance of the stained pixels' OD (unbiased, as torchstain's cov)
    weights = stained.unsqueeze(-1).float()
    n = counts.clamp_min(2).float()
    mean = (od * weights).sum(dim=1) / n[:, None]
    centred = (od - mean[:, None, :]) * weights
    covariance = centred.transpose(1, 2) @ centred / (n - 1)[:, None, None]
    covariance = torch.where(estimable[:, None, None], covariance, torch.eye(3, device=device))
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    plane = eigenvectors[:, :, 1:3]  # (B, 3, 2)
    # eigenvector signs are arbitrary (and differ between devices): point both into the positive
    # OD octant so the stain angles never wrap around ±pi
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)

    projected = od @ plane  # (B, P, 2)
    angles = torch.atan2(projected[..., 1], projected[..., 0])
    angles = torch.where(stained, angles, torch.inf).sort(dim=1).values
    low = _nearest_rank(angles, stains.alpha, counts)
    high = _nearest_rank(angles, 100.0 - stains.alpha, counts)
    v_low = (plane @ torch.stack((low.cos(), low.sin()), dim=1)[..., None])[..., 0]  # (B, 3)
    v_high = (plane @ torch.stack((high.cos(), high.sin()), dim=1)[..., None])[..., 0]
    # haematoxylin first: the vector with the larger red OD
    low_first = (v_low[:, 0] > v_high[:, 0])[:, None, None]
    matrix = torch.where(
        low_first, torch.stack((v_low, v_high), dim=2), torch.stack((v_high, v_low), dim=2)
    )  # (B, 3, 2)

    cosine = (matrix[:, :, 0] * matrix[:, :, 1]).sum(dim=1).abs() / (
        matrix.norm(dim=1).prod(dim=1).clamp_min(1e-12)
    )
    separable = estimable & torch.isfinite(matrix).all(dim=(1, 2)) & (cosine <= MAX_STAIN_COSINE)
    matrix = torch.where(separable[:, None, None], matrix, target_matrix)

    # least-squares concentrations (2, P) per patch via the 2 × 2 normal equations
    gram = matrix.transpose(1, 2) @ matrix
    concentrations = torch.linalg.solve(gram, matrix.transpose(1, 2) @ od.transpose(1, 2))
    rank = 1 + round(0.01 * CONCENTRATION_PERCENTILE * (pixels - 1))
    maxima = concentrations.kthvalue(rank, dim=2).values  # (B, 2)
    present = torch.isfinite(maxima) & (maxima >= MIN_CONCENTRATION)
    scale = torch.where(present, target_maxima / torch.where(present, maxima, 1.0), 1.0)
    concentrations = concentrations * scale[:, :, None]

    recomposed = stains.light_intensity * torch.exp(-(target_matrix @ concentrations))
    normalised = recomposed.nan_to_num(255.0).clamp(0, 255).to(torch.uint8)
    normalised = normalised.reshape(batch, channels, height, width)
    return torch.where(worth_it[:, None, None, None], normalised, images)
