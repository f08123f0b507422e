"""The encoder registry: every entry builds (or is described) correctly; weights load or fail
with a message that says how to provide them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from slidemil.encoders import get_encoder, get_encoder_spec, list_encoders, register_encoder
from slidemil.encoders.registry import Transform, WeightsSource
from slidemil.errors import MissingExtraError, RegistryError, WeightsError

TORCH_THREADS = 1  # see conftest._torch_threads


def _installed(extra: str | None) -> bool:
    module = {"hub": "timm", None: None}.get(extra, extra)
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("name", list_encoders())
def test_every_entry_is_complete_and_builds_with_declared_dim(name):
    spec = get_encoder_spec(name)
    assert spec.output_dim > 0
    assert len(spec.transform.mean) == 3 and len(spec.transform.std) == 3
    assert spec.licence and spec.description
    if "pathology" in spec.tags:
        assert spec.hf_id and spec.extra, "foundation models name their HF id and extra"
    if not _installed(spec.extra):
        with pytest.raises(MissingExtraError, match="pip install"):
            get_encoder(name, weights="random")
        return
    if spec.expensive:
        pytest.skip(f"{name}: too slow to run on this CPU (checked on the meta device below)")
    encoder = get_encoder(name, weights="random")
    size = spec.transform.input_size or 64
    batch = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        features = encoder(batch)
    assert tuple(features.shape) == (2, spec.output_dim)
    assert torch.isfinite(features).all()


# Facts of the published checkpoints (config.json / model cards): millions of parameters and the
# shape of the position embedding, which a checkpoint of another patch size, register count or
# ``no_embed_class`` setting would not fit.
CHECKPOINT_FACTS = {
    "uni": (303.4, "pos_embed", (1, 197, 1024)),
    "uni2-h": (681.4, "pos_embed", (1, 256, 1536)),
    "virchow2": (631.2, "pos_embed", (1, 261, 1280)),
    "h-optimus-0": (1134.8, "pos_embed", (1, 256, 1536)),
    "prov-gigapath": (1134.9, "pos_embed", (1, 197, 1536)),
    "conch": (87.6, "trunk.pos_embed", (1, 785, 768)),
    "phikon": (85.8, "embeddings.position_embeddings", (1, 197, 768)),
    "phikon-v2": (303.4, "embeddings.position_embeddings", (1, 197, 1024)),
}


@pytest.mark.parametrize("name", list_encoders())
def test_every_architecture_builds_on_the_meta_device_with_its_card(name):
    """Every entry, foundation models included: no memory, no time, no weights."""
    from slidemil.encoders.registry import checkpoint_target

    spec = get_encoder_spec(name)
    if not _installed(spec.extra):
        pytest.skip(f"{name} needs {spec.extra!r}, not installed here")
    size = spec.transform.input_size or 224
    with torch.device("meta"):
        model = spec.builder(pretrained=False)
        out = model(torch.empty(2, 3, size, size))
    assert out.is_meta and tuple(out.shape) == (2, spec.output_dim)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(spec.params_millions, rel=0.02)
    if name in CHECKPOINT_FACTS:
        params, key, shape = CHECKPOINT_FACTS[name]
        assert millions == pytest.approx(params, abs=0.1)
        assert tuple(checkpoint_target(model).state_dict()[key].shape) == shape


def test_a_wrapped_encoder_loads_the_authors_checkpoint_and_its_own(tmp_path):
    """Wrappers name the module the published file fits; other parts and a prefix are dropped."""
    from slidemil.encoders.registry import EncoderSpec
    from slidemil.encoders.weights import load_state_into

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))

        @property
        def checkpoint_module(self) -> torch.nn.Module:
            return self.vit

    spec = EncoderSpec(
        "toy", Wrapper, 3, Transform(), WeightsSource("hf-file", "x/y.bin", ("text.", "scale"))
    )
    torch.manual_seed(5)
    source = Wrapper()
    published = {f"visual.{k}": v for k, v in source.vit.state_dict().items()}
    published.update({"text.proj": torch.zeros(2), "scale": torch.ones(1)})
    for state in (published, source.state_dict()):  # authors' layout, then slidemil's wrapper
        model = Wrapper()
        load_state_into(model, state, spec, tmp_path / "ckpt.bin")
        assert torch.equal(model.vit[0].weight, source.vit[0].weight)
    with pytest.raises(WeightsError, match=r"ckpt\.bin: does not fit encoder 'toy'.*missing"):
        load_state_into(
            Wrapper(), {"visual.0.weight": torch.zeros(3, 4)}, spec, tmp_path / "ckpt.bin"
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uni"])
def test_a_foundation_model_builds_offline_with_random_weights(name):
    pytest.importorskip("timm")
    encoder = get_encoder(name, weights="random")
    with torch.inference_mode():
        out = encoder(torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8))
    assert tuple(out.shape) == (1, get_encoder_spec(name).output_dim)


def test_random_weights_are_seeded_and_explicit():
    a, b = get_encoder("resnet18", "random"), get_encoder("resnet18", "random")
    batch = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(a(batch), b(batch))
    assert a.weights_identity == "random:seed=0"


def test_duplicate_name_is_an_error():
    with pytest.raises(RegistryError, match="registered twice"):
        register_encoder(
            "resnet18",
            output_dim=1,
            transform=Transform(),
            weights=WeightsSource("torchvision", "x"),
        )(lambda pretrained=False: None)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(RegistryError, match="resnet50-trunc"):
        get_encoder_spec("resnet51")


def _trained_resnet18() -> torch.nn.Module:
    torch.manual_seed(123)  # differs from the registry's random seed
    return get_encoder_spec("resnet18").builder(pretrained=False).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_file_loads_and_gives_the_models_output(tmp_path, suffix):
    model = _trained_resnet18()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier the encoder drops is allowed
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":  # as DDP training scripts save it
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        save_file(state, str(path))
    encoder = get_encoder("resnet18", weights=path)
    batch = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model(encoder.preprocess(batch))
        assert torch.allclose(encoder(batch), expected, atol=1e-6)
        assert not torch.allclose(get_encoder("resnet18", "random")(batch), expected)
    assert encoder.weights_identity.startswith(f"file:ckpt{suffix} sha256:")


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(get_encoder_spec("resnet34").builder().state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet34.pth: does not fit encoder 'resnet18'.*"
                       r"(unexpected|missing|wrong-shape) key"):  # fmt: skip
        get_encoder("resnet18", weights=path)


def test_missing_weights_file_is_one_clear_line(tmp_path):
    with pytest.raises(WeightsError, match=r"nothing\.pth: weights file not found"):
        get_encoder("resnet18", weights=tmp_path / "nothing.pth")


def test_missing_pretrained_weights_offline_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SLIDEMIL_OFFLINE", "1")
    monkeypatch.delenv("SLIDEMIL_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError) as info:
        get_encoder("resnet50-trunc")
    message = str(info.value)
    assert "\n" not in message
    assert "resnet50-0676ba61.pth" in message  # the exact file torchvision would cache
    assert "$SLIDEMIL_WEIGHTS_DIR/resnet50-trunc.pth" in message
    assert "--weights random" in message


def test_local_checkpoint_dir_is_used_by_default(tmp_path, monkeypatch):
    model = _trained_resnet18()
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    monkeypatch.setenv("SLIDEMIL_WEIGHTS_DIR", str(tmp_path))
    encoder = get_encoder("resnet18")
    assert encoder.weights_identity.startswith("file:resnet18.pth")
    (tmp_path / "local_checkpoints.yaml").write_text("resnet18: missing.pth\n")
    with pytest.raises(WeightsError, match=r"maps 'resnet18' to .*missing\.pth"):
        get_encoder("resnet18")


def test_hub_model_offline_and_not_cached_is_a_weights_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("SLIDEMIL_OFFLINE", "1")
    monkeypatch.delenv("SLIDEMIL_WEIGHTS_DIR", raising=False)
    with pytest.raises(
        WeightsError, match=r"bioptimus/H-optimus-0: .*not in the Hugging Face cache"
    ):
        get_encoder("h-optimus-0")


def test_gated_model_without_token_says_where_to_accept_terms(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    for var in (
        "SLIDEMIL_OFFLINE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "SLIDEMIL_WEIGHTS_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(WeightsError, match=r"gated model.*huggingface.co/MahmoodLab/UNI.*HF_TOKEN"):
        get_encoder("uni")


# A Hugging Face hub repository as its cache holds it: two commits, `main` on the first and the
# tag `v2` on the second, each with its own weights file. Offline, huggingface_hub resolves
# revisions from exactly this layout, so the test runs the real resolution code.
HUB_REVISION_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from slidemil.encoders import get_encoder, register_encoder
from slidemil.encoders.registry import Transform, WeightsSource
from slidemil.errors import ConfigError

def tiny(pretrained=False):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())

register_encoder("tiny-hub", output_dim=4, transform=Transform(),
                 weights=WeightsSource("hf-file", "test-org/tiny/weights.pt"),
                 hf_id="test-org/tiny", extra="hub")(tiny)
main, tagged = get_encoder("tiny-hub"), get_encoder("tiny-hub", revision="v2")
pinned = get_encoder("tiny-hub", revision=sys.argv[1])
print(json.dumps({
    "main": main.weights_identity, "v2": tagged.weights_identity, "pinned": pinned.weights_identity,
    "main_bias": main.model[0].bias.tolist(), "v2_bias": tagged.model[0].bias.tolist(),
}))
"""


def test_hub_revision_loads_that_commit_and_records_its_hash(tmp_path):
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "hub" / "models--test-org--tiny"
    commits = {"main": "a" * 40, "v2": "b" * 40}
    for ref, commit in commits.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        layer = torch.nn.Conv2d(3, 4, 3)
        torch.nn.init.constant_(layer.bias, 1.0 if ref == "main" else 2.0)
        torch.save({f"0.{k}": v for k, v in layer.state_dict().items()}, snapshot / "weights.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env.pop("SLIDEMIL_WEIGHTS_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", HUB_REVISION_SCRIPT, commits["v2"]], capture_output=True,
        text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["main"] == f"hf-file:test-org/tiny/weights.pt@{commits['main']}"
    assert found["v2"] == found["pinned"] == f"hf-file:test-org/tiny/weights.pt@{commits['v2']}"
    assert found["main_bias"] == [1.0] * 4 and found["v2_bias"] == [2.0] * 4


def test_revision_of_weights_that_are_not_on_the_hub_is_refused():
    with pytest.raises(WeightsError, match=r"--revision v2 applies to Hugging Face weights only"):
        get_encoder("resnet18", revision="v2")
