"""ImageNet encoders from torchvision: ResNets (incl. CLAM's truncated ResNet50) and a ViT.

ResNets take patches at their own size (CLAM feeds 256 px patches unresized); the ViT needs 224 px.
Builders import torchvision lazily so registering costs nothing.
"""

from __future__ import annotations

from typing import Any

from slidemil.encoders.registry import Transform, WeightsSource, register_encoder

CNN_TRANSFORM = Transform(resize=None)  # fully convolutional + global pool: any patch size
VIT_TRANSFORM = Transform(resize=224)
BSD = "BSD-3-Clause code; ImageNet weights for research use"


def _resnet_trunk(arch: str, keep_layer4: bool) -> Any:
    """A torchvision ResNet without its classifier (and without layer4 when truncated).

    Parameter names stay torchvision's, so ImageNet checkpoints load as they are.
    """
    import torch
    import torchvision

    class ResNetTrunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            net = getattr(torchvision.models, arch)(weights=None)
            self.conv1, self.bn1, self.relu, self.maxpool = (
                net.conv1,
                net.bn1,
                net.relu,
                net.maxpool,
            )
            self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
            self.layer4 = net.layer4 if keep_layer4 else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer3(self.layer2(self.layer1(x)))
            if self.layer4 is not None:
                x = self.layer4(x)
            return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)

    return ResNetTrunk()


@register_encoder(
    "resnet50-trunc",
    output_dim=1024,
    transform=CNN_TRANSFORM,
    weights=WeightsSource("torchvision", "ResNet50_Weights.IMAGENET1K_V1", ("layer4.", "fc.")),
    licence=BSD,
    params_millions=8.5,
    autocast_dtype="float16",
    tags=("cnn", "imagenet"),
)
def resnet50_trunc(pretrained: bool = False) -> Any:
    """ImageNet ResNet50 up to layer3 + global average pool (the CLAM standard, 1024-d)."""
    return _resnet_trunk("resnet50", keep_layer4=False)


@register_encoder(
    "resnet50",
    output_dim=2048,
    transform=CNN_TRANSFORM,
    weights=WeightsSource("torchvision", "ResNet50_Weights.IMAGENET1K_V2", ("fc.",)),
    licence=BSD,
    params_millions=23.5,
    autocast_dtype="float16",
    tags=("cnn", "imagenet"),
)
def resnet50(pretrained: bool = False) -> Any:
    """ImageNet ResNet50 + global average pool (2048-d)."""
    return _resnet_trunk("resnet50", keep_layer4=True)


@register_encoder(
    "resnet34",
    output_dim=512,
    transform=CNN_TRANSFORM,
    weights=WeightsSource("torchvision", "ResNet34_Weights.IMAGENET1K_V1", ("fc.",)),
    licence=BSD,
    params_millions=21.3,
    autocast_dtype="float16",
    tags=("cnn", "imagenet"),
)
def resnet34(pretrained: bool = False) -> Any:
    """ImageNet ResNet34 + global average pool (512-d)."""
    return _resnet_trunk("resnet34", keep_layer4=True)


@register_encoder(
    "resnet18",
    output_dim=512,
    transform=CNN_TRANSFORM,
    weights=WeightsSource("torchvision", "ResNet18_Weights.IMAGENET1K_V1", ("fc.",)),
    licence=BSD,
    params_millions=11.2,
    autocast_dtype="float16",
    tags=("cnn", "imagenet"),
)
def resnet18(pretrained: bool = False) -> Any:
    """ImageNet ResNet18 + global average pool (512-d), small and fast: tests and demos."""
    return _resnet_trunk("resnet18", keep_layer4=True)


@register_encoder(
    "vit_b_16",
    output_dim=768,
    transform=VIT_TRANSFORM,
    weights=WeightsSource("torchvision", "ViT_B_16_Weights.IMAGENET1K_V1", ("heads.",)),
    licence=BSD,
    params_millions=85.8,
    tags=("vit", "imagenet"),
)
def vit_b_16(pretrained: bool = False) -> Any:
    """ImageNet ViT-B/16 at 224 px, class token (768-d)."""
    import torch
    import torchvision

    model = torchvision.models.vit_b_16(weights=None)
    model.heads = torch.nn.Identity()
    return model
