"""The stain target: one RGB image of well-stained tissue, read and checked once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from slidemil.errors import ConfigError
from slidemil.stain.optical_density import MIN_TISSUE_FRACTION, tissue_fraction

if TYPE_CHECKING:
    import torch

MAX_TARGET_PIXELS = 4096 * 4096  # a target is a patch or a small region, not a slide
TARGET_FIX = "give a PNG, JPEG or TIFF patch of well-stained H&E tissue"


def read_target_image(
    path: str | Path, min_tissue_fraction: float = MIN_TISSUE_FRACTION
) -> torch.Tensor:
    """The target image as a (3, H, W) uint8 tensor.

    RGBA images (OpenSlide regions saved as PNG) are composited on white. Raises
    :class:`~slidemil.errors.ConfigError` naming the file when it is missing, unreadable, not RGB,
    larger than 4096² px, or has a smaller fraction of tissue pixels than ``min_tissue_fraction``.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "stain target image does not exist", TARGET_FIX)
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > MAX_TARGET_PIXELS:
                raise ConfigError(
                    path,
                    f"stain target is {opened.width} × {opened.height} px, more than 4096² px",
                    "crop a region of well-stained tissue",
                )
            if opened.mode not in ("RGB", "RGBA"):
                raise ConfigError(
                    path, f"stain target is a {opened.mode} image, not RGB", TARGET_FIX
                )
            image = opened.convert("RGBA")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ConfigError(path, f"stain target is not a readable image ({e})", TARGET_FIX) from e
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = np.asarray(Image.alpha_composite(white, image).convert("RGB"))
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    fraction = float(tissue_fraction(tensor[None])[0])
    if fraction < min_tissue_fraction:
        raise ConfigError(
            path,
            f"stain target has no tissue to fit: {fraction:.1%} of its pixels are tissue, "
            f"at least {min_tissue_fraction:.0%} needed",
            TARGET_FIX,
        )
    return tensor
