"""The encoder registry: one :class:`EncoderSpec` per name, registered next to its builder.

An entry carries everything needed to use an encoder correctly (after torchvision's ``Weights``
and lazyslide's model cards): the architecture builder (random init, never a download), where the
pretrained weights come from, the input transform, the output size, the licence and gating, the
Hugging Face id, the optional extra it needs and the autocast dtype it prefers. Features can
therefore never be computed with the wrong normalisation.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from slidemil.errors import RegistryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Transform:
    """How patches become model input (applied on the device, batched).

    A uint8 RGB patch of ``patch_size`` px is resized to ``resize`` px (``None``: kept at its own
    size, as CLAM feeds ResNets), centre-cropped to ``crop`` px (``None``: no crop), scaled to
    [0, 1] and normalised with ``mean`` / ``std`` per channel.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def input_size(self) -> int | None:
        """Side in px of what the model receives (``None``: the patch size)."""
        return self.crop or self.resize

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class WeightsSource:
    """Where the pretrained weights of an entry come from.

    ``kind``: ``"torchvision"`` (``ref`` = ``"ResNet50_Weights.IMAGENET1K_V1"``), ``"timm-hub"``
    (``ref`` = ``"hf-hub:MahmoodLab/UNI"``, loaded by ``timm.create_model(ref, pretrained=True)``),
    ``"hf-transformers"`` (``ref`` = ``"hf:<repo id>"``, loaded by ``from_pretrained``) or
    ``"hf-file"`` (``ref`` = ``"<repo id>/<file>"``: one checkpoint file of a Hugging Face repo,
    loaded into the locally built architecture, e.g. CONCH's ``pytorch_model.bin``).
    ``ignored_keys``: checkpoint key prefixes of parts the encoder drops (the classifier, the
    text tower of a vision-language model).
    """

    kind: str
    ref: str
    ignored_keys: tuple[str, ...] = ()
    sha256: str | None = None


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder (the model card)."""

    name: str
    builder: Callable[..., Any]  # (pretrained: bool) -> torch.nn.Module giving (B, output_dim)
    output_dim: int
    transform: Transform
    weights: WeightsSource
    description: str = ""
    licence: str = ""
    gated: bool = False
    hf_id: str | None = None
    extra: str | None = None  # optional dependency group, e.g. "hub"
    autocast_dtype: str | None = "bfloat16"  # preferred on CUDA; None: run in float32
    params_millions: float | None = None
    expensive: bool = False  # too slow to run on a CPU in a test: checked on the meta device
    tags: tuple[str, ...] = field(default_factory=tuple)

    def card(self) -> dict[str, Any]:
        """The metadata as plain values (for tables, config files and feature attributes)."""
        return {
            "name": self.name,
            "output_dim": self.output_dim,
            "input_size": self.transform.input_size,
            "weights": f"{self.weights.kind}:{self.weights.ref}",
            "licence": self.licence,
            "gated": self.gated,
            "hf_id": self.hf_id,
            "extra": self.extra,
            "autocast_dtype": self.autocast_dtype,
            "params_millions": self.params_millions,
            "description": self.description,
        }


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str,
    *,
    output_dim: int,
    transform: Transform,
    weights: WeightsSource,
    **card: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated builder under ``name`` (a duplicate is an error).

    The builder takes ``pretrained: bool``; with ``False`` it must build the architecture with
    random weights and touch no network; with ``True`` it may load weights itself (sources
    whose loader builds the model, such as ``timm.create_model(pretrained=True)``).
    """

    def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise RegistryError(None, f"encoder {name!r} is registered twice")
        description = card.pop("description", None) or (builder.__doc__ or "").strip()
        _REGISTRY[name] = EncoderSpec(
            name=name,
            builder=builder,
            output_dim=output_dim,
            transform=transform,
            weights=weights,
            description=description.splitlines()[0] if description else "",
            **card,
        )
        return builder

    return decorate


def _load_entries() -> None:
    # Entry modules register on import; they import torch lazily inside the builders, so this
    # is cheap and never touches the network.
    from slidemil.encoders import foundation, torchvision_encoders  # noqa: F401


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder names matching a shell pattern (``"resnet*"``), sorted."""
    _load_entries()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of ``name``; :class:`RegistryError` listing the known names otherwise."""
    _load_entries()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise RegistryError(
            None,
            f"unknown encoder {name!r}",
            f"choose one of {', '.join(sorted(_REGISTRY))} (see `slidemil encoders`)",
        )
    return spec


def checkpoint_target(model: Any) -> Any:
    """The module a released checkpoint of ``model`` loads into.

    Builders that wrap a timm or ``transformers`` backbone (to pool tokens, say) name it with a
    ``checkpoint_module`` attribute, so the checkpoint the authors publish loads as it is.
    """
    return getattr(model, "checkpoint_module", model)


@dataclass
class Encoder:
    """A built encoder: the model, its spec and the identity of the weights it holds.

    ``weights_identity`` is recorded in every feature file: ``"random:seed=0"``,
    ``"torchvision:ResNet50_Weights.IMAGENET1K_V1"``, ``"hf-hub:MahmoodLab/UNI"`` or
    ``"file:<name> sha256:<hex>"``.
    """

    model: Any  # torch.nn.Module mapping (B, 3, H, W) float -> (B, output_dim)
    spec: EncoderSpec
    weights_identity: str
    _norm: dict[Any, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def output_dim(self) -> int:
        return self.spec.output_dim

    def _mean_std(self, device: Any, dtype: Any) -> tuple[Any, Any]:
        # Cached per device: building them per batch would be a blocking host->GPU copy each time.
        key = (str(device), dtype)
        if key not in self._norm:
            import torch

            t = self.spec.transform
            mean = torch.tensor(t.mean, dtype=dtype).view(1, 3, 1, 1).to(device)
            std = torch.tensor(t.std, dtype=dtype).view(1, 3, 1, 1).to(device)
            self._norm[key] = (mean, std)
        return self._norm[key]

    def preprocess(self, batch: Any) -> Any:
        """uint8 (B, 3, H, W) on any device -> normalised float32 model input on that device.

        Memory format is kept: a channels-last batch (NHWC storage) stays channels-last.
        """
        import torch.nn.functional as F

        t = self.spec.transform
        x = batch.float().div_(255.0)
        if t.resize is not None and tuple(x.shape[-2:]) != (t.resize, t.resize):
            x = F.interpolate(
                x, size=(t.resize, t.resize), mode=t.interpolation, antialias=True,
                align_corners=False,
            )  # fmt: skip
        if t.crop is not None and tuple(x.shape[-2:]) != (t.crop, t.crop):
            top = (x.shape[-2] - t.crop) // 2
            left = (x.shape[-1] - t.crop) // 2
            x = x[..., top : top + t.crop, left : left + t.crop]
        mean, std = self._mean_std(x.device, x.dtype)
        return (x - mean) / std

    def __call__(self, batch: Any) -> Any:
        """Features (B, output_dim) of a uint8 (B, 3, H, W) batch (no autocast, no grad mode)."""
        return self.model(self.preprocess(batch))
