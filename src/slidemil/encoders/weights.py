"""Weight sources: torchvision, timm / Hugging Face hub, local files, and explicit "random".

Resolution of the default (pretrained) weights of an encoder, first match wins:

1. a local checkpoint for it under ``$SLIDEMIL_WEIGHTS_DIR`` (``<name>.safetensors|.pth|.pt|.bin``,
   or a ``local_checkpoints.yaml`` there mapping name -> file), for offline HPC nodes;
2. its own source: the torchvision cache (``$TORCH_HOME``) or download, or the Hugging Face hub
   (token from ``HF_TOKEN`` / ``huggingface-cli login``; ``HF_HUB_OFFLINE=1`` uses the cache only).

Anything missing is a one-line :class:`WeightsError` saying how to provide it; a missing package is
a :class:`MissingExtraError`. Nothing here falls back silently to other weights, and nothing
touches the network at import.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

from slidemil.encoders.registry import Encoder, EncoderSpec, checkpoint_target, get_encoder_spec
from slidemil.errors import MissingExtraError, WeightsError

WEIGHTS_DIR_ENV = "SLIDEMIL_WEIGHTS_DIR"
OFFLINE_ENVS = ("SLIDEMIL_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
LOCAL_MAP_NAME = "local_checkpoints.yaml"
RANDOM = "random"
RANDOM_SEED = 0  # random weights are seeded so two runs (or ranks) compute the same features
# Wrappers training frameworks put around a state dict, and key prefixes they add.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "teacher", "module")
KEY_PREFIXES = ("module.", "_orig_mod.")


def is_offline() -> bool:
    """True when ``SLIDEMIL_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENVS
    )


def require(module: str, extra: str | None, what: str) -> Any:
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        fix = f"pip install 'slidemil[{extra}]'" if extra else f"pip install {module}"
        raise MissingExtraError(None, f"{what} needs the package {module!r}", fix) from e


def get_encoder(
    name: str,
    weights: str | Path | None = None,
    *,
    revision: str | None = None,
    progress: bool = False,
) -> Encoder:
    """Build encoder ``name`` in eval mode with its weights.

    Args:
        name: a registry name (see :func:`slidemil.encoders.list_encoders`).
        weights: ``None`` for the entry's pretrained weights, ``"random"`` for seeded random
            weights (an explicit choice, for tests and benchmarks), or a checkpoint file
            (``.pth``/``.pt``/``.bin``/``.safetensors``) holding a state dict of this architecture.
        revision: for Hugging Face weights, the branch, tag or commit to load (default: the
            repository's ``main``). Whatever is asked, the weights identity records the commit
            hash it resolved to (``hf-hub:MahmoodLab/UNI@<40 hex>``), so features made from
            another commit are never mixed with these.
        progress: show download progress bars.
    """
    spec = get_encoder_spec(name)
    if revision is not None and (weights is not None or spec.hf_id is None):
        source = f"--weights {weights}" if weights is not None else f"{spec.name!r}"
        raise WeightsError(
            None,
            f"--revision {revision} applies to Hugging Face weights only, not to {source}",
            "drop --revision",
        )
    if weights is not None and str(weights) == RANDOM:
        model, identity = _random(spec), f"{RANDOM}:seed={RANDOM_SEED}"
    elif weights is not None:
        model, identity = _from_file(spec, Path(weights).expanduser())
    else:
        local = local_checkpoint(spec.name) if revision is None else None
        if local is not None:
            model, identity = _from_file(spec, local)
        else:
            model, identity = _pretrained(spec, progress, revision)
    return Encoder(model.eval().requires_grad_(False), spec, identity)


# -- random -------------------------------------------------------------------------------------
def _random(spec: EncoderSpec) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return spec.builder(pretrained=False)


# -- local files --------------------------------------------------------------------------------
def local_checkpoint(name: str) -> Path | None:
    """The checkpoint for ``name`` under ``$SLIDEMIL_WEIGHTS_DIR``, or ``None``."""
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    folder_path = Path(folder).expanduser()
    mapping = folder_path / LOCAL_MAP_NAME
    if mapping.is_file():
        from slidemil.config import read_yaml

        entry = read_yaml(mapping).get(name)
        if entry is not None:
            path = Path(str(entry)).expanduser()
            path = path if path.is_absolute() else folder_path / path
            if not path.is_file():
                raise WeightsError(mapping, f"maps {name!r} to {path}, which does not exist")
            return path
    for suffix in CHECKPOINT_SUFFIXES:
        candidate = folder_path / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be several GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a checkpoint file, unwrapped from the usual training wrappers."""
    import torch

    if not path.is_file():
        raise WeightsError(
            path, "weights file not found", "give an existing .pth/.safetensors file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(path, f"cannot read checkpoint: {type(e).__name__}: {e}") from e
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(path, "does not hold a state dict (name -> tensor)")
    for prefix in KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_into(model: Any, state: dict[str, Any], spec: EncoderSpec, source: Path) -> None:
    """Load ``state`` strictly into the module the published checkpoint fits.

    Parts the encoder drops (``ignored_keys``) may be present, and one leading key component
    shared by every key (``"visual."``, a wrapper's ``"vit."``) is stripped when that makes the
    keys fit, so both the authors' file and a checkpoint of slidemil's wrapper load.
    """
    target = checkpoint_target(model)
    ignored = spec.weights.ignored_keys
    state = {k: v for k, v in state.items() if not (ignored and k.startswith(ignored))}
    expected = target.state_dict()
    state = _strip_shared_prefix(state, set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong-shape", wrong_shape)):  # fmt: skip
            if keys:
                parts.append(f"{len(keys)} {label} key(s) e.g. {', '.join(keys[:3])}")
        raise WeightsError(
            source,
            f"does not fit encoder {spec.name!r}: {'; '.join(parts)}",
            "give a checkpoint of this architecture or choose the encoder it was trained as",
        )
    target.load_state_dict(state, strict=True)


def _strip_shared_prefix(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    if not state or set(state) == expected:
        return state
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1 or not all("." in k for k in state):
        return state
    stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
    return stripped if len(set(stripped) & expected) > len(set(state) & expected) else state


def _from_file(spec: EncoderSpec, path: Path) -> tuple[Any, str]:
    state = read_state_dict(path)
    model = _random(spec)
    load_state_into(model, state, spec, path)
    return model, f"file:{path.name} sha256:{file_sha256(path)}"


# -- pretrained sources -------------------------------------------------------------------------
def _offline_fix(spec: EncoderSpec) -> str:
    return (
        f"put the checkpoint at ${WEIGHTS_DIR_ENV}/{spec.name}.pth (or .safetensors), pass "
        "--weights FILE, or --weights random to run without pretrained weights"
    )


def _pretrained(spec: EncoderSpec, progress: bool, revision: str | None) -> tuple[Any, str]:
    kind = spec.weights.kind
    if kind == "torchvision":
        return _torchvision(spec, progress), f"torchvision:{spec.weights.ref}"
    if kind == "hf-file":
        model, commit = _hub_file(spec, revision)
        return model, f"hf-file:{spec.weights.ref}@{commit}"
    if kind in ("timm-hub", "hf-transformers"):
        _check_hub_access(spec, revision)
        # Resolve the revision to its commit first and load exactly that commit.
        _, commit = hub_download(spec, "config.json", revision)
        try:
            model = spec.builder(pretrained=True, revision=commit)
        except (MissingExtraError, WeightsError):
            raise
        except Exception as e:
            raise WeightsError(
                spec.hf_id or spec.weights.ref,
                f"cannot load weights of {spec.name!r}: {type(e).__name__}: {e}"[:400],
                _hub_fix(spec),
            ) from e
        return model, f"{spec.weights.ref}@{commit}"
    raise WeightsError(None, f"encoder {spec.name!r} has unknown weights source {kind!r}")


def hub_download(spec: EncoderSpec, filename: str, revision: str | None) -> tuple[Path, str]:
    """``filename`` of the entry's Hugging Face repository at ``revision`` (branch, tag or
    commit; ``None``: ``main``), downloaded or, offline, from the cache; returns the local file
    and the commit hash the revision resolved to."""
    hub = require("huggingface_hub", spec.extra or "hub", f"encoder {spec.name!r}")
    repo = spec.hf_id or spec.weights.ref.rpartition("/")[0]
    try:
        path = Path(hub.hf_hub_download(repo, filename, revision=revision))
    except Exception as e:
        at = f" at revision {revision}" if revision else ""
        raise WeightsError(
            repo,
            f"cannot get {filename}{at} of {spec.name!r}: {type(e).__name__}: {e}"[:400],
            _hub_fix(spec),
        ) from e
    return path, _snapshot_commit(path, revision)


def _snapshot_commit(path: Path, revision: str | None) -> str:
    """The commit of a file in the hub cache: the folder below ``snapshots/`` holding it."""
    for folder in path.parents:
        if folder.parent.name == "snapshots":
            return folder.name
    return revision or "main"  # not a cache layout (a local folder): the revision as asked


def _hub_file(spec: EncoderSpec, revision: str | None) -> tuple[Any, str]:
    """One checkpoint file of a hub repository (downloaded, or from the HF cache) loaded into the
    locally built architecture; returns the model and the commit it came from."""
    _check_hub_access(spec, revision)
    path, commit = hub_download(spec, spec.weights.ref.rpartition("/")[2], revision)
    model = _random(spec)
    load_state_into(model, read_state_dict(path), spec, path)
    return model, commit


def _torchvision(spec: EncoderSpec, progress: bool) -> Any:
    import torch
    import torchvision

    enum_name, _, member = spec.weights.ref.partition(".")
    entry = getattr(getattr(torchvision.models, enum_name), member)
    url = entry.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file() and is_offline():
        raise WeightsError(
            cached,
            f"ImageNet weights of {spec.name!r} are not in the torchvision cache and the node is "
            "offline",
            f"download {url} into $TORCH_HOME/hub/checkpoints/ on a machine with internet, "
            + _offline_fix(spec),
        )
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True)
    except (URLError, OSError, RuntimeError) as e:
        raise WeightsError(
            url,
            f"cannot download ImageNet weights of {spec.name!r}: {e}",
            f"put the file at {cached}, or " + _offline_fix(spec),
        ) from e
    model = spec.builder(pretrained=False)
    load_state_into(model, state, spec, cached)
    return model


def _hub_fix(spec: EncoderSpec) -> str:
    gate = (
        f"accept the terms at https://huggingface.co/{spec.hf_id} and set HF_TOKEN "
        "(or run `huggingface-cli login`); "
        if spec.gated
        else ""
    )
    return f"{gate}on offline nodes fill the HF cache first (HF_HOME) or " + _offline_fix(spec)


def _check_hub_access(spec: EncoderSpec, revision: str | None = None) -> None:
    """Fail early, in one line, when the hub cannot possibly serve the weights."""
    if spec.hf_id is None:
        return
    hub = require("huggingface_hub", spec.extra or "hub", f"encoder {spec.name!r}")
    if is_offline():
        probe = "config.json"
        if spec.weights.kind == "hf-file":
            probe = spec.weights.ref.rpartition("/")[2]
        cached = hub.try_to_load_from_cache(spec.hf_id, probe, revision=revision)
        if not isinstance(cached, str):
            raise WeightsError(
                spec.hf_id,
                f"weights of {spec.name!r} are not in the Hugging Face cache and HF_HUB_OFFLINE "
                "is set",
                _hub_fix(spec),
            )
        return
    if spec.gated and hub.get_token() is None:
        raise WeightsError(
            spec.hf_id, f"{spec.name!r} is a gated model and no Hugging Face token is set",
            _hub_fix(spec),
        )  # fmt: skip
