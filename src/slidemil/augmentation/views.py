"""Augmented views of patches, each one reproducible from (seed, slide, patch, view).

A view's random draws come from a counter-based hash (SplitMix64) of the seed, the slide id,
the patch's level-0 coordinates and the view number, not from a generator that advances with
every batch: so a view is the same whatever the batch size, the worker count, the shard or rank
that made it, and a resumed run makes the very views an uninterrupted one would. Each op reads its
own fixed draws, so enabling blur, say, leaves a view's stain jitter as it was.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from slidemil.augmentation import ops
from slidemil.augmentation.spec import AugmentSpec

# Draw slots of each op (uniforms in [0, 1) per patch and view); fixed, whatever ops are chosen.
_SLOTS = {"flip": (0, 2), "rot90": (2, 1), "hed": (3, 6), "colour": (9, 3), "hue": (12, 1),
          "blur": (13, 1)}  # fmt: skip
_N_SLOTS = 14
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def slide_key(slide_id: str) -> int:
    """A stable 64-bit number for a slide id (the same in every process and Python run)."""
    return int.from_bytes(
        hashlib.blake2b(slide_id.encode("utf-8"), digest_size=8).digest(), "little"
    )


def patch_keys(seed: int, slide_id: str, coords: np.ndarray) -> np.ndarray:
    """One uint64 key per patch from the seed, the slide id and its level-0 ``coords`` (N, 2)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2).view(np.uint64)
    base = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _splitmix(base ^ np.uint64(slide_key(slide_id)))
    keys = _splitmix(base ^ coords[:, 0])
    return _splitmix(keys ^ coords[:, 1])


def view_draws(keys: np.ndarray, view: int) -> np.ndarray:
    """Uniforms in [0, 1), float64 (N, slots), for view ``view`` of the patches with ``keys``."""
    per_view = _splitmix(keys ^ _splitmix(np.array([view], dtype=np.uint64)))
    slots = np.arange(1, _N_SLOTS + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix(per_view[:, None] + slots[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Augmenter:
    """Makes view ``v`` of a batch of uint8 patches (B, 3, H, W) on their device, following an
    :class:`~slidemil.augmentation.spec.AugmentSpec`."""

    def __init__(self, spec: AugmentSpec):
        self.spec = spec
        # One blur radius for every batch (3 sigma of the strongest blur): same shapes each call.
        self.blur_radius = math.ceil(3.0 * spec.strengths.get("blur", 0.0))

    @property
    def views(self) -> int:
        return self.spec.views

    def keys(self, slide_id: str, coords: np.ndarray) -> np.ndarray:
        """The patch keys of ``coords`` (level-0 x, y (B, 2)) of slide ``slide_id``."""
        return patch_keys(self.spec.seed, slide_id, coords)

    def __call__(self, images: torch.Tensor, keys: np.ndarray, view: int) -> torch.Tensor:
        """View ``view`` (0 to views-1) of ``images`` (uint8 (B, 3, H, W)); uint8, same device."""
        if images.shape[0] != len(keys):
            raise ValueError(f"{images.shape[0]} images for {len(keys)} patch keys")
        draws = torch.from_numpy(view_draws(keys, view).astype(np.float32))
        if images.device.type == "cuda":  # pinned, so the copy does not wait for the GPU
            draws = draws.pin_memory().to(images.device, non_blocking=True)
        else:
            draws = draws.to(images.device)
        chosen = set(self.spec.ops)

        def slot(name: str) -> torch.Tensor:
            start, count = _SLOTS[name]
            return draws[:, start : start + count]

        def spread(name: str, columns: torch.Tensor) -> torch.Tensor:  # U(-s, s)
            return (2.0 * columns - 1.0) * self.spec.strengths[name]

        x = images
        if "flip" in chosen:
            flips = slot("flip") < 0.5
            x = ops.flip(x, flips[:, 0], flips[:, 1])
        if "rot90" in chosen:
            x = ops.rotate90(x, (slot("rot90")[:, 0] * 4).long().clamp_(max=3))
        if not chosen & {"hed", "colour", "hue", "blur"}:
            return x.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        if "hed" in chosen:
            hed = slot("hed")
            matrix, offset = ops.hed_affine(
                1.0 + spread("hed", hed[:, :3]), spread("hed", hed[:, 3:])
            )
            x = ops.from_density(ops.optical_density(x), matrix, offset)
        else:
            x = x.float()
        if chosen & {"colour", "hue"}:
            ones = torch.ones(len(keys), device=x.device)
            factors = 1.0 + spread("colour", slot("colour")) if "colour" in chosen else None
            turns = spread("hue", slot("hue")[:, 0]) if "hue" in chosen else ones * 0.0
            b, c, s = (ones, ones, ones) if factors is None else factors.unbind(1)
            matrix, offset = ops.colour_affine(b, c, s, turns, ops.mean_grey(x))
            x = ops.affine(x, matrix, offset).clamp_(0.0, ops.WHITE)
        if "blur" in chosen:
            sigma = slot("blur")[:, 0] * self.spec.strengths["blur"]
            x = ops.gaussian_blur(x, sigma, self.blur_radius)
        return x.round_().to(torch.uint8)
