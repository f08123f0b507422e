"""Augmentations for the views stored at extraction: what each op does to real pixels, that a
view depends only on (seed, slide, patch coordinates, view), and that bad options are named.

Extraction with views (features, resume, CLI) is tested in ``tests/test_extraction.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidemil.augmentation import ops
from slidemil.augmentation.spec import augment_spec, parse_ops, parse_strengths
from slidemil.augmentation.views import Augmenter, patch_keys, view_draws
from slidemil.errors import ConfigError
from slidemil.extraction.config import ExtractConfig

TORCH_THREADS = 1  # see conftest._torch_threads


def _patches(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Tissue-like uint8 patches (B, 3, H, W): smooth pink-purple blobs on light background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))
        noise = rng.normal(0, 6, (size, size, 3))
        rgb = np.stack([235 - 60 * blob, 225 - 140 * blob, 235 - 50 * blob], -1) + noise
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def _coords(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 256, np.arange(n) % 3 * 512], 1).astype(np.int64)


def test_ops_are_canonically_ordered_and_defaults_filled():
    spec = augment_spec(3, "blur, hed,flip", "hed=0.1", seed=5)
    assert spec.ops == ("flip", "hed", "blur")
    assert spec.strengths == {"hed": 0.1, "blur": 1.0}
    assert spec.to_record() == {
        "views": 3, "ops": ["flip", "hed", "blur"], "strengths": {"hed": 0.1, "blur": 1.0},
        "seed": 5,
    }  # fmt: skip
    assert augment_spec(0, "flip") is None
    assert parse_strengths({"colour": "0.2"}) == {"colour": 0.2}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"views": 2, "augment": "flip,sharpen"}, "unknown augmentation sharpen: choose from"),
        ({"views": 2, "augment": "flip,flip"}, "augmentation flip given twice"),
        ({"views": 2, "augment": ""}, "2 views asked with no augmentation"),
        ({"views": 2, "augment_strength": "hed=2"}, "strength hed=2.0 is outside [0.0, 1.0]"),
        ({"views": 2, "augment_strength": "rot90=1"}, "no strength to set for 'rot90'"),
        ({"views": 2, "augment_strength": "hed"}, "strength 'hed' must be OP=VALUE"),
        ({"views": 2, "augment": "flip", "augment_strength": "blur=1"}, "not among the"),
        ({"stain_norm": "macenko"}, "--stain-norm and --stain-target go together"),
    ],
)
def test_bad_augmentation_options_are_one_line_errors(options, message):
    from slidemil.config import build

    with pytest.raises(ConfigError) as info:
        build(ExtractConfig, section="extract", overrides=options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_op_names_the_known_ones():
    with pytest.raises(ValueError, match="flip, rot90, hed, colour, hue, blur"):
        parse_ops(["flip", "elastic"])


def test_flips_and_quarter_turns_move_pixels_exactly():
    images = _patches(4)
    yes, no = torch.tensor([True, False, True, False]), torch.tensor([False, False, True, True])
    flipped = ops.flip(images, yes, no)
    expected = [images[0].flip(-1), images[1], images[2].flip(-1).flip(-2), images[3].flip(-2)]
    assert torch.equal(flipped, torch.stack(expected))
    turned = ops.rotate90(images, torch.tensor([0, 1, 2, 3]))
    for k in range(4):
        assert torch.equal(turned[k], torch.rot90(images[k], k, dims=(-2, -1)))


def _concentrations(images: torch.Tensor) -> torch.Tensor:
    """H, E, DAB concentrations (B, 3, H, W) of the Ruifrok-Johnston deconvolution."""
    vectors = torch.tensor(ops.HED_VECTORS)
    stains = vectors / vectors.norm(dim=1, keepdim=True)
    density = ops.optical_density(images)
    return torch.einsum("bchw,cs->bshw", density, torch.linalg.inv(stains))


def test_hed_jitter_scales_the_stain_it_is_asked_to_and_identity_keeps_the_image():
    images = _patches(2)
    matrix, offset = ops.hed_affine(torch.ones(2, 3), torch.zeros(2, 3))
    same = ops.from_density(ops.optical_density(images), matrix, offset).round().to(torch.uint8)
    assert (same.int() - images.clamp(min=1).int()).abs().max() == 0
    scale = torch.tensor([[1.3, 1.0, 1.0], [1.0, 0.7, 1.0]])
    matrix, offset = ops.hed_affine(scale, torch.zeros(2, 3))
    jittered = ops.from_density(ops.optical_density(images), matrix, offset)
    before, after = _concentrations(images), _concentrations(jittered.round().to(torch.uint8))
    dark = before[:, 0] > 0.3  # stained pixels, where rounding is small against the stain
    ratio_h = (after[0, 0][dark[0]] / before[0, 0][dark[0]]).median()
    ratio_e = (after[1, 1] / before[1, 1])[before[1, 1] > 0.3].median()
    assert ratio_h == pytest.approx(1.3, abs=0.05) and ratio_e == pytest.approx(0.7, abs=0.05)
    # the other stain of each image is left as it was
    assert (after[0, 1] - before[0, 1])[dark[0]].abs().median() < 0.02


def test_colour_jitter_matches_brightness_contrast_saturation_done_step_by_step():
    images = _patches(3).float()
    b, c, s = torch.tensor([0.9, 1.1, 1.0]), torch.tensor([1.2, 0.8, 1.0]), torch.rand(3) + 0.5
    matrix, offset = ops.colour_affine(b, c, s, torch.zeros(3), ops.mean_grey(images))
    luma = torch.tensor(ops.LUMA).view(1, 3, 1, 1)
    step = images * b.view(-1, 1, 1, 1)
    mean = (step * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    step = c.view(-1, 1, 1, 1) * step + (1 - c.view(-1, 1, 1, 1)) * mean
    grey = (step * luma).sum(1, keepdim=True)
    step = s.view(-1, 1, 1, 1) * step + (1 - s.view(-1, 1, 1, 1)) * grey
    torch.testing.assert_close(ops.affine(images, matrix, offset), step, atol=1e-3, rtol=1e-5)


def test_hue_rotation_keeps_grey_and_a_third_turn_cycles_the_channels():
    images = _patches(2).float()
    ones = torch.ones(2)
    grey = torch.full((2, 3, 4, 4), 120.0)
    matrix, offset = ops.colour_affine(ones, ones, ones, torch.tensor([0.1, 0.3]), ones * 120)
    torch.testing.assert_close(ops.affine(grey, matrix, offset), grey, atol=1e-3, rtol=0)
    matrix, offset = ops.colour_affine(ones, ones, ones, ones / 3, ops.mean_grey(images))
    torch.testing.assert_close(
        ops.affine(images, matrix, offset), images[:, [2, 0, 1]], atol=1e-3, rtol=0
    )


def test_blur_smooths_and_sigma_zero_is_the_identity():
    images = _patches(2).float()
    kept = ops.gaussian_blur(images, torch.zeros(2), radius=3)
    assert torch.equal(kept, images)
    blurred = ops.gaussian_blur(images, torch.tensor([0.0, 1.5]), radius=5)
    assert torch.equal(blurred[0], images[0])
    detail = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert detail(blurred[1]) < 0.6 * detail(images[1])
    torch.testing.assert_close(blurred[1].mean(), images[1].mean(), atol=0.5, rtol=0)


def test_views_differ_from_the_patch_and_from_each_other():
    images = _patches(8)
    augment = Augmenter(augment_spec(3, "flip,rot90,hed,colour,blur", seed=0))
    keys = augment.keys("slide-a", _coords(8))
    views = [augment(images, keys, v) for v in range(3)]
    for view in views:
        assert view.dtype == torch.uint8 and view.shape == images.shape
        assert (view.float() - images.float()).abs().mean() > 2
    assert (views[0].float() - views[1].float()).abs().mean() > 2


def test_a_view_depends_on_seed_slide_patch_and_view_not_on_the_batch():
    images = _patches(10)
    augment = Augmenter(augment_spec(2, "flip,rot90,hed,colour,hue,blur", seed=3))
    coords = _coords(10)
    keys = augment.keys("slide-a", coords)
    whole = augment(images, keys, 1)
    order = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    parts = [augment(images[order[:3]], keys[order[:3]], 1), augment(images[order[3:]],
             keys[order[3:]], 1)]  # fmt: skip
    assert torch.equal(torch.cat(parts), whole[order])  # other batches, other order: same views
    again = Augmenter(augment_spec(2, "flip,rot90,hed,colour,hue,blur", seed=3))
    assert torch.equal(again(images, again.keys("slide-a", coords), 1), whole)
    for other in (
        patch_keys(4, "slide-a", coords),  # seed
        patch_keys(3, "slide-b", coords),  # slide
        patch_keys(3, "slide-a", coords + 256),  # place
    ):
        assert not np.array_equal(view_draws(other, 1), view_draws(keys, 1))
    assert not np.array_equal(view_draws(keys, 0), view_draws(keys, 1))


def test_draws_are_uniform_and_each_op_keeps_its_own():
    draws = view_draws(patch_keys(0, "s", _coords(4000)), 0)
    assert draws.min() >= 0 and draws.max() < 1
    assert np.abs(draws.mean(axis=0) - 0.5).max() < 0.03
    assert np.abs(np.corrcoef(draws.T) - np.eye(draws.shape[1])).max() < 0.1
    # turning blur on leaves a view's stain jitter as it was
    images = _patches(4)
    keys = patch_keys(0, "s", _coords(4))
    hed = Augmenter(augment_spec(1, "hed", seed=0))(images, keys, 0)
    hed_blur = Augmenter(augment_spec(1, "hed,blur", "blur=0", seed=0))(images, keys, 0)
    assert torch.equal(hed, hed_blur)
