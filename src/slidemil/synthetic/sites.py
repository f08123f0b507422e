"""Hospital sites for synthetic cohorts: each site stains and scans in its own way.

A site re-stains every rendered pixel in optical density (OD, Beer–Lambert): the pixel's OD is
unmixed into haematoxylin, eosin and residual concentrations with Ruifrok & Johnston's stain
vectors (Anal Quant Cytol Histol 2001), the haematoxylin and eosin concentrations are scaled by
the site's staining intensity, and the concentrations are mixed back with the site's own stain
hues. Then a scanner-like white balance scales each RGB channel. Because the whole change is
one 3 × 3 map in OD plus a per-channel gain, every pyramid level agrees with level 0, and a
Macenko-style normaliser can in principle undo it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Ruifrok & Johnston's OD vectors (unit length) of haematoxylin, eosin and the residual (DAB).
REFERENCE_STAINS = np.array(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], np.float64
)
HAEMATOXYLIN_GAINS = (0.65, 1.4)  # range of staining intensities over the sites
EOSIN_GAINS = (0.6, 1.45)
HUE_SHIFT = 0.18  # largest change of a stain vector's components before renormalising
SCANNER_GAINS = (0.93, 1.03)  # per-channel white balance


@dataclass(frozen=True)
class SiteStain:
    """How one site stains and scans: concentration gains of haematoxylin and eosin, the site's
    haematoxylin and eosin OD vectors (unit length, RGB) and its scanner's RGB gains."""

    name: str
    haematoxylin_gain: float
    eosin_gain: float
    haematoxylin_vector: tuple[float, float, float]
    eosin_vector: tuple[float, float, float]
    scanner_gain: tuple[float, float, float]

    def od_map(self) -> np.ndarray:
        """The 3 × 3 matrix ``T`` with ``od_site = od @ T`` (OD as row vectors)."""
        site_stains = np.array(
            [self.haematoxylin_vector, self.eosin_vector, REFERENCE_STAINS[2]], np.float64
        )
        gains = np.diag([self.haematoxylin_gain, self.eosin_gain, 1.0])
        return np.linalg.inv(REFERENCE_STAINS) @ gains @ site_stains

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The (H, W, 3) uint8 RGB ``image`` as this site would have stained and scanned it."""
        od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
        site_od = od @ self.od_map().astype(np.float32)
        rgb = (256.0 * np.exp(-site_od) - 1.0) * np.asarray(self.scanner_gain, np.float32)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SiteStain:
        return cls(
            name=str(values["name"]),
            haematoxylin_gain=float(values["haematoxylin_gain"]),
            eosin_gain=float(values["eosin_gain"]),
            haematoxylin_vector=_triple(values["haematoxylin_vector"]),
            eosin_vector=_triple(values["eosin_vector"]),
            scanner_gain=_triple(values["scanner_gain"]),
        )


def _triple(values) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def site_names(n_sites: int) -> list[str]:
    return [f"site_{k + 1}" for k in range(n_sites)]


def make_site_stains(n_sites: int, seed: int) -> list[SiteStain]:
    """``n_sites`` sites whose staining intensities are spread evenly over their ranges (in a
    random order, so no two sites are alike) and whose hues and scanners are drawn at random;
    deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 1013])

    def spread(low: float, high: float) -> np.ndarray:
        return low + (high - low) * (rng.permutation(n_sites) + 0.5) / n_sites

    haematoxylin, eosin = spread(*HAEMATOXYLIN_GAINS), spread(*EOSIN_GAINS)
    sites = []
    for k, name in enumerate(site_names(n_sites)):
        sites.append(
            SiteStain(
                name=name,
                haematoxylin_gain=float(haematoxylin[k]),
                eosin_gain=float(eosin[k]),
                haematoxylin_vector=_shifted(REFERENCE_STAINS[0], rng),
                eosin_vector=_shifted(REFERENCE_STAINS[1], rng),
                scanner_gain=_triple(rng.uniform(*SCANNER_GAINS, 3)),
            )
        )
    return sites


def _shifted(vector: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    moved = np.clip(vector + rng.uniform(-HUE_SHIFT, HUE_SHIFT, 3), 0.02, None)
    return _triple(moved / math.sqrt(float(moved @ moved)))
