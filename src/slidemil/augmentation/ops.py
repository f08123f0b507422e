"""Batched image augmentations with one parameter set per image, on any device.

Every function takes a batch of RGB patches (B, 3, H, W) and per-image parameters (tensors with
B rows on the batch's device), with no Python loop over images, so the same code runs on the CPU
and on the GPU. Geometric ops work on uint8. The stain and colour ops work on float pixel values
in [0, 255]; each of them is an affine map per image (in optical density for the stains, in RGB
for brightness, contrast, saturation and hue), so a whole colour jitter is one batched 3 x 3
matrix product instead of a pass over the pixels per op. Batches are best kept channels-last
(NHWC storage), as extraction keeps them: the products then run on contiguous memory.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston (2001) stain vectors: the optical density of pure haematoxylin, eosin and
# DAB in R, G, B (normalised to unit length below); the colour deconvolution of H&E(-DAB).
HED_VECTORS = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_RGB_FROM_HED = np.asarray(HED_VECTORS) / np.linalg.norm(HED_VECTORS, axis=1, keepdims=True)
# Inverted once on the host: a device inverse checks for singularity, which waits for the GPU.
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# ITU-R 601 luma: the grey that contrast and saturation blend towards (torchvision's too).
LUMA = (0.299, 0.587, 0.114)
WHITE = 255.0
_A = 1.0 / math.sqrt(3.0)  # the unit grey axis is (a, a, a); its cross-product matrix:
_GREY_CROSS = ((0.0, -_A, _A), (_A, 0.0, -_A), (-_A, _A, 0.0))
_CONSTANTS = {"rgb_from_hed": _RGB_FROM_HED, "hed_from_rgb": _HED_FROM_RGB, "luma": LUMA,
              "grey_cross": _GREY_CROSS}  # fmt: skip


@functools.lru_cache(maxsize=64)
def _constant(name: str, device: torch.device) -> torch.Tensor:
    """A float32 constant on ``device``, copied there once (a copy per batch would make the
    host wait for the GPU each time)."""
    return torch.tensor(_CONSTANTS[name], dtype=torch.float32).to(device)


def flip(images: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``horizontal`` / ``vertical`` flag (bool (B,)) is set."""
    out = torch.where(horizontal.view(-1, 1, 1, 1), images.flip(-1), images)
    return torch.where(vertical.view(-1, 1, 1, 1), out.flip(-2), out)


def rotate90(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by ``turns`` (int (B,), 0-3) quarter turns.

    Selects among the four rotations of the batch instead of indexing the images of each turn,
    so nothing waits for the device (no data-dependent shapes).
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rot90 needs square patches, got {tuple(images.shape[-2:])} px")
    out = images
    for k in range(1, 4):
        chosen = (turns == k).view(-1, 1, 1, 1)
        out = torch.where(chosen, torch.rot90(images, k, dims=(-2, -1)), out)
    return out


def optical_density(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB -> optical density ``-ln(I / 255)`` (float32, same layout); a 0 pixel counts as
    1 (the darkest a uint8 can say without infinite density)."""
    return images.float().clamp_(min=1.0).div_(WHITE).log_().neg_()


def hed_affine(scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The optical-density map of a stain jitter: per image, the H, E and DAB concentrations
    ``c`` become ``c * scale + shift`` (``scale``, ``shift``: (B, 3), shift in ln-density units).

    Returns ``(matrix (B, 3, 3), offset (B, 3))`` acting on density row vectors
    (``d' = d @ matrix + offset``), for :func:`from_density`.
    """
    rgb_from_hed = _constant("rgb_from_hed", scale.device)
    hed_from_rgb = _constant("hed_from_rgb", scale.device)
    matrix = hed_from_rgb @ (scale.unsqueeze(-1) * rgb_from_hed)  # inv(M) diag(scale) M
    return matrix, shift @ rgb_from_hed


def from_density(density: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Map densities by ``d @ matrix + offset`` per image and return pixel values in [0, 255]."""
    light = affine(density, matrix, offset - math.log(WHITE))  # exp(-(d' - ln 255)) = 255 e^-d'
    return torch.exp(light.neg_()).clamp_(max=WHITE)


def colour_affine(
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue_turns: torch.Tensor,
    mean_grey: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, then contrast, then saturation, then hue, as one affine map per image.

    ``brightness`` scales the pixels; ``contrast`` blends with the image's mean grey (``mean_grey``
    (B,), before brightness) and ``saturation`` with each pixel's grey (0: grey, 1: unchanged);
    ``hue_turns`` rotates colours about the grey axis by that fraction of a turn (grey stays
    grey). All (B,). Returns ``(matrix (B, 3, 3), offset (B, 3))`` on RGB row vectors; being
    composed exactly, the steps clip nothing in between (the result is clamped once).
    """
    device = brightness.device
    luma = _constant("luma", device)
    eye = torch.eye(3, device=device)
    s = saturation.view(-1, 1, 1)
    # Column-vector maps: saturation S = s I + (1 - s) 1 L; hue R = Rodrigues about (1,1,1)/sqrt3.
    desaturate = s * eye + (1.0 - s) * torch.ones(3, 1, device=device) * luma.view(1, 3)
    angle = 2.0 * math.pi * hue_turns.to(torch.float32)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    cross = _constant("grey_cross", device)
    rotate = cos * eye + sin * cross + (1.0 - cos) * torch.full((3, 3), _A * _A, device=device)
    # x' = R S (c b x + (1 - c) b m 1) and R S 1 = 1 (luma sums to 1, R fixes the grey axis).
    gain = (contrast * brightness).view(-1, 1, 1)
    column = gain * (rotate @ desaturate)
    offset = ((1.0 - contrast) * brightness * mean_grey).view(-1, 1).expand(-1, 3)
    return column.transpose(1, 2), offset


def affine(images: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``x @ matrix + offset`` on every pixel's channel vector: ``images`` float (B, 3, H, W),
    ``matrix`` (B, 3, 3), ``offset`` (B, 3). Returns channels-last (B, 3, H, W)."""
    b, c, h, w = images.shape
    pixels = images.permute(0, 2, 3, 1).reshape(b, h * w, c)  # free for channels-last input
    out = torch.baddbmm(offset.unsqueeze(1), pixels, matrix)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def mean_grey(images: torch.Tensor) -> torch.Tensor:
    """Each image's mean luma (B,), in the images' value units (summed in float64, so the
    result does not depend on how many threads split the sum)."""
    luma = _constant("luma", images.device)
    return images.mean(dim=(-2, -1), dtype=torch.float64).float() @ luma


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each image with a separable Gaussian of ``sigma`` px (B,) cut at ``radius`` px (the
    same for the batch, so one grouped convolution does it; sigma 0 leaves the image as is).
    Edges are extended by replication. Returns channels-last float (B, 3, H, W)."""
    if radius < 1:
        return images
    b, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    spread = sigma.to(torch.float32).clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / spread) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    padded = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    # one image's channels as the channels of one "image": a depthwise convolution, which
    # oneDNN and cuDNN run fastest channels-last
    x = padded.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w).contiguous(memory_format=torch.channels_last)
