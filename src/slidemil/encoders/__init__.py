"""Patch encoders: a registry of feature extractors with their weights and transforms.

    >>> from slidemil.encoders import list_encoders, get_encoder
    >>> encoder = get_encoder("resnet50-trunc")          # ImageNet weights (cache or download)
    >>> encoder = get_encoder("resnet18", weights="random")
    >>> features = encoder(uint8_batch)                   # (B, 3, H, W) uint8 -> (B, 512)

``slidemil encoders`` prints the registry as a table. New entries register themselves with the
:func:`register_encoder` decorator next to their builder.
"""

from slidemil.encoders.registry import (
    Encoder,
    EncoderSpec,
    Transform,
    WeightsSource,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)
from slidemil.encoders.weights import get_encoder

__all__ = [
    "Encoder",
    "EncoderSpec",
    "Transform",
    "WeightsSource",
    "get_encoder",
    "get_encoder_spec",
    "list_encoders",
    "register_encoder",
]
