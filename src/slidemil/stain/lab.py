"""sRGB <-> CIE L*a*b* (D65) for batches of images, (B, 3, H, W) float in 0–1.

The same formulas and constants as torchstain's per-image ``rgb2lab``/``lab2rgb`` (the sRGB
primaries, the D65 white, the 0.008856 / 7.787 linear segment), so Reinhard's statistics agree
with the ones torchstain fits on the target image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
D65_WHITE = (0.95047, 1.0, 1.08883)


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    matrix = torch.tensor(RGB_TO_XYZ, dtype=torch.float32, device=device)
    white = torch.tensor(D65_WHITE, dtype=torch.float32, device=device)[None, :, None, None]
    return matrix, white


def _linear(rgb: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """L* (0–100), a*, b* of sRGB values: uint8 (0–255) or float in 0–1; (B, 3, H, W) in,
    float32 (B, 3, H, W) out."""
    import torch

    matrix, white = _constants(rgb.device)
    if rgb.dtype == torch.uint8:  # a 256-entry table instead of a power per pixel
        levels = torch.arange(256, dtype=torch.float32, device=rgb.device) / 255.0
        linear = _linear(levels)[rgb.long()]
    else:
        linear = _linear(rgb)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz ** (1 / 3), 7.787 * xyz + 16 / 116)
    lightness = 116.0 * f[:, 1] - 16.0
    a = 500.0 * (f[:, 0] - f[:, 1])
    b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack((lightness, a, b), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """sRGB values clamped to 0–1 of L*a*b* values; both (B, 3, H, W) float32."""
    import torch

    matrix, white = _constants(lab.device)
    y = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack((lab[:, 1] / 500.0 + y, y, y - lab[:, 2] / 200.0), dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * white
    linear = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(matrix), xyz)
    positive = linear.clamp_min(0.0031308)  # keeps the unused branch of where() finite
    rgb = torch.where(linear > 0.0031308, 1.055 * positive ** (1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0.0, 1.0)
