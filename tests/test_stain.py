"""Stain normalisation: batched Macenko and Reinhard against torchstain, fallbacks, state."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from slidemil.errors import ConfigError
from slidemil.formats.feature_file import read_feature_file
from slidemil.stain import StainNormalizer, WeakStainSeparationWarning, fit_stain_normalizer
from slidemil.synthetic.textures import LESION_STYLES, STROMA, texture

TORCH_THREADS = 1
PATCH = 96
# the synthetic textures' target fits two close stain vectors; the test of that warning is below
pytestmark = pytest.mark.filterwarnings("ignore::slidemil.stain.WeakStainSeparationWarning")


def _patches(
    n: int, seed: int, gains: tuple[float, float, float] = (1.0, 1.0, 1.0), stroma: bool = True
) -> np.ndarray:
    """(n, PATCH, PATCH, 3) uint8 H&E-like patches, optical density scaled per channel by
    ``gains`` (a stain / scanner shift); ``stroma=False`` leaves out pale stroma (too few pixels
    stained in every channel for torchstain's per-image Macenko, which then fails)."""
    rng = np.random.default_rng(seed)
    styles = (STROMA, *LESION_STYLES[:4]) if stroma else LESION_STYLES[:4]
    out = []
    for i in range(n):
        tex = texture(styles[i % len(styles)], 0.5)
        y, x = rng.integers(0, tex.shape[0] - PATCH, 2)
        od = -np.log((tex[y : y + PATCH, x : x + PATCH].astype(np.float32) + 1) / 256)
        out.append(np.clip(256 * np.exp(-od * np.asarray(gains)) - 1, 0, 255).astype(np.uint8))
    return np.stack(out)


def _batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def target_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("stain") / "target.png"
    Image.fromarray(texture(LESION_STYLES[2], 0.5)[:256, :256]).save(path)
    return path


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_batched_result_matches_torchstain_per_image(method, target_png):
    normalizer = fit_stain_normalizer(method, target_png)
    images = _batch(_patches(10, seed=1, gains=(1.15, 0.9, 1.05), stroma=False))
    batched = normalizer(images)
    target = torch.from_numpy(np.array(Image.open(target_png))).permute(2, 0, 1).contiguous()
    if method == "macenko":
        reference = TorchMacenkoNormalizer()
        reference.fit(target)
        expected = [reference.normalize(image, stains=False)[0] for image in images]
    else:
        reference = TorchReinhardNormalizer()
        reference.fit(target)
        expected = [reference.normalize(image) for image in images]
    expected = torch.stack([e.clamp(0, 255).to(torch.uint8).permute(2, 0, 1) for e in expected])
    difference = (batched.int() - expected.int()).abs()
    assert int(difference.max()) <= 1  # float rounding on the last uint8 level only
    assert float((batched != images).float().mean()) > 0.5  # it did change the patches


def _two_stain_patches(
    n: int, seed: int, haematoxylin: tuple[float, ...], eosin: tuple[float, ...], gains
) -> torch.Tensor:
    """(n, 3, PATCH, PATCH) uint8 patches composed in OD from two stains (Beer–Lambert): nuclei
    and a diffuse counterstain of haematoxylin over a textured eosin background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:PATCH, :PATCH]
    h_vector = np.asarray(haematoxylin) / np.linalg.norm(haematoxylin)
    e_vector = np.asarray(eosin) / np.linalg.norm(eosin)
    out = []
    for _ in range(n):
        nuclei = np.zeros((PATCH, PATCH))
        for cx, cy in rng.uniform(0, PATCH, (25, 2)):
            nuclei += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0**2))
        h = 0.25 + 1.2 * np.clip(nuclei, 0, 1)
        e = 0.5 + 0.25 * np.sin(xx / rng.uniform(4, 9) + rng.uniform(0, 6)) * np.cos(yy / 7)
        od = gains[0] * h[..., None] * h_vector + gains[1] * e[..., None] * e_vector
        out.append(np.clip(240 * np.exp(-od) - 1, 0, 255).astype(np.uint8))
    return _batch(np.stack(out))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_brings_two_stainings_together(method, tmp_path):
    target = tmp_path / "target.png"
    reference = _two_stain_patches(1, 0, (0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (1.0, 1.0))
    Image.fromarray(reference[0].permute(1, 2, 0).numpy()).save(target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two distinct stains: no weak-separation warning
        normalizer = fit_stain_normalizer(method, target)
    site_a = _two_stain_patches(8, 1, (0.55, 0.78, 0.30), (0.10, 0.97, 0.20), (1.4, 0.7))
    site_b = _two_stain_patches(8, 1, (0.70, 0.68, 0.22), (0.05, 0.95, 0.30), (0.7, 1.3))

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float().mean(dim=(2, 3)) - b.float().mean(dim=(2, 3))).abs().mean())

    assert gap(normalizer(site_a), normalizer(site_b)) < 0.3 * gap(site_a, site_b)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_background_comes_back_unchanged_and_nothing_is_nan(method, target_png):
    normalizer = fit_stain_normalizer(method, target_png)
    white = np.full((PATCH, PATCH, 3), 244, np.uint8)
    black_dot = white.copy()
    black_dot[:3, :3] = 20  # a speck of dust on glass: under 5% tissue
    eosin_only = np.zeros_like(white)
    eosin_only[:] = (236, 170, 204)  # flat pale stroma: no pixel stained in every channel
    eosin_only[::7] = (226, 150, 190)
    images = _batch(np.stack([white, black_dot, eosin_only, _patches(1, seed=3)[0]]))
    out = normalizer(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out[0], images[0]) and torch.equal(out[1], images[1])
    # a patch alone gives the same result as inside a batch
    for i in range(len(images)):
        assert torch.equal(normalizer(images[i : i + 1])[0], out[i])
    tiny = torch.full((2, 3, 3, 3), 100, dtype=torch.uint8)  # too few pixels for statistics
    assert torch.equal(normalizer(tiny), tiny)
    assert normalizer(images[:0]).shape == (0, 3, PATCH, PATCH)


def test_reinhard_leaves_glass_alone_and_ignores_it_in_the_statistics(target_png):
    normalizer = fit_stain_normalizer("reinhard", target_png)
    tissue = _patches(1, seed=7, gains=(1.3, 1.0, 0.8), stroma=False)[0]
    half_glass = tissue.copy()
    half_glass[:, : PATCH // 2] = 244  # glass, with a scanner's slight tint
    out = normalizer(_batch(np.stack([tissue, half_glass])))
    glass = out[1, :, :, : PATCH // 2]
    assert torch.equal(glass, _batch(half_glass[None])[0, :, :, : PATCH // 2])
    # the tissue half is normalised as it would be without the glass beside it
    difference = out[1, :, :, PATCH // 2 :].int() - out[0, :, :, PATCH // 2 :].int()
    assert float(difference.abs().float().mean()) < 3.0


def test_eosin_only_patch_uses_the_target_stains(target_png):
    normalizer = fit_stain_normalizer("macenko", target_png)
    stroma = np.zeros((PATCH, PATCH, 3), np.uint8)
    stroma[:] = (236, 170, 204)
    stroma[::5] = (226, 150, 190)
    out = normalizer(_batch(stroma[None]))
    assert not torch.equal(out[0], _batch(stroma[None])[0])  # normalised, not skipped
    assert int(out.min()) > 0  # no blown-up (NaN -> 0) pixels


def test_state_round_trips_through_json_without_the_target(target_png, tmp_path):
    for method in ("macenko", "reinhard"):
        normalizer = fit_stain_normalizer(method, target_png)
        state = json.loads(json.dumps(normalizer.to_state()))
        assert state["method"] == method
        assert state["target"]["name"] == "target.png" and len(state["target"]["sha256"]) == 64
        restored = StainNormalizer.from_state(state)
        images = _batch(_patches(4, seed=4, gains=(1.2, 1.0, 0.9)))
        assert torch.equal(restored(images), normalizer(images))
    broken = {**state, "parameters": {"means": [1.0]}}
    with pytest.raises(ConfigError, match=r"run\.json: stain normalisation state is incomplete"):
        StainNormalizer.from_state(broken, source="run.json")


def test_channels_last_input_gives_the_same_result(target_png):
    normalizer = fit_stain_normalizer("macenko", target_png)
    nhwc = torch.from_numpy(_patches(3, seed=5))
    channels_last = nhwc.permute(0, 3, 1, 2)  # a view, as extraction passes decoded batches
    assert torch.equal(normalizer(channels_last), normalizer(channels_last.contiguous()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_cuda_result_matches_cpu(method, target_png):
    normalizer = fit_stain_normalizer(method, target_png)
    images = _batch(_patches(6, seed=6, gains=(1.1, 0.9, 1.1)))
    on_device = normalizer(images.cuda())
    assert on_device.device.type == "cuda"
    assert int((on_device.cpu().int() - normalizer(images).int()).abs().max()) <= 1


def test_a_target_with_two_close_stains_is_warned_about(target_png):
    with pytest.warns(WeakStainSeparationWarning, match=r"target\.png: .* degrees apart"):
        normalizer = fit_stain_normalizer("macenko", target_png)
    assert normalizer.parameters.separation_degrees() < 12


def test_bad_targets_get_one_line_errors_naming_the_file(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(grey)
    glass = tmp_path / "glass.png"
    Image.fromarray(np.full((64, 64, 3), 245, np.uint8)).save(glass)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    one_stain = tmp_path / "one_stain.png"
    Image.fromarray(np.full((64, 64, 3), (90, 40, 140), np.uint8)).save(one_stain)
    cases = [
        (tmp_path / "missing.png", "macenko", "does not exist"),
        (grey, "macenko", "is a L image, not RGB"),
        (glass, "reinhard", "no tissue"),
        (text, "macenko", "not a readable image"),
        (one_stain, "macenko", "cannot be fitted with macenko"),
    ]
    for path, method, problem in cases:
        with pytest.raises(ConfigError) as caught:
            fit_stain_normalizer(method, path)
        message = str(caught.value)
        assert str(path) in message and problem in message and "\n" not in message
    with pytest.raises(ConfigError, match="unknown stain normalisation method"):
        fit_stain_normalizer("vahadane", glass)  # type: ignore[arg-type]


# -- through prediction: the run's normaliser is applied to new slides ---------------------------


@pytest.fixture(scope="module")
def stained_run(tmp_path_factory):
    """8 small SVS slides, patched, Macenko-normalised to a target patch, encoded
    (resnet18, random weights) and a 2-fold run trained on them; the target is then deleted."""
    from slidemil.extraction import extract
    from slidemil.patching import patch
    from slidemil.synthetic import synth
    from slidemil.training import train

    root = tmp_path_factory.mktemp("stained_run")
    synth(root / "cohort", slides=8, classes=2, size=768, seed=4, max_slides_per_patient=1,
          quiet=True)  # fmt: skip
    patch(root / "cohort" / "cohort.csv", root / "work", mpp=1.0, patch_size=64, workers=1,
          previews=False, quiet=True)  # fmt: skip
    target = root / "target.png"
    Image.fromarray(texture(LESION_STYLES[2], 0.5)[:256, :256]).save(target)
    common = dict(encoder="resnet18", weights="random", device="cpu", batch_size=64, workers=0)
    extract(root / "work", **common, stain_norm="macenko", stain_target=str(target), quiet=True)
    extract(root / "work", **common, features_name="plain", quiet=True)
    train(root / "work", root / "run", encoder="resnet18", folds=2, epochs=1, hidden_dim=16,
          attention_dim=8, device="cpu", quiet=True)  # fmt: skip
    target.unlink()  # prediction must not need it
    return root


@pytest.mark.slow
def test_predict_applies_the_runs_stain_normalisation_to_new_slides(stained_run, tmp_path, capsys):
    from slidemil.formats.feature_file import read_feature_attrs
    from slidemil.prediction import predict

    csv = stained_run / "cohort" / "cohort.csv"
    trained = stained_run / "work" / "features" / "resnet18"
    raw = predict(stained_run / "run", csv, tmp_path / "raw", device="cpu", workers=0)
    assert "stain normalisation: macenko fitted on target.png" in capsys.readouterr().out
    assert not raw.failed and len(raw.predictions) == 8
    new = tmp_path / "raw" / "work" / "features" / "resnet18"
    for slide_id in raw.predictions["slide_id"]:
        assert (
            read_feature_attrs(new / f"{slide_id}.h5")["stain_normalization"]
            == (read_feature_attrs(trained / f"{slide_id}.h5")["stain_normalization"])
        )
        np.testing.assert_allclose(
            read_feature_file(new / f"{slide_id}.h5").features,
            read_feature_file(trained / f"{slide_id}.h5").features,
            atol=1e-4,
        )  # the same normaliser, so the same features as in training
    from_features = predict(stained_run / "run", csv, tmp_path / "feat", features=trained,
                            quiet=True)  # fmt: skip
    columns = [c for c in raw.predictions.columns if c.startswith("prob_")]
    np.testing.assert_allclose(
        raw.predictions[columns].to_numpy(), from_features.predictions[columns].to_numpy(),
        atol=1e-4,
    )  # fmt: skip


@pytest.mark.slow
def test_predict_refuses_features_normalised_otherwise(stained_run, tmp_path):
    from slidemil.prediction import predict

    csv = stained_run / "cohort" / "cohort.csv"
    plain = stained_run / "work" / "features" / "plain"
    summary = predict(stained_run / "run", csv, tmp_path / "out", features=plain, quiet=True)
    assert len(summary.failed) == 8 and len(summary.predictions) == 0
    message = next(iter(summary.failed.values()))
    assert "no stain normalisation" in message and "macenko fitted on target.png" in message
