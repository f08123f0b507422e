"""Pathology foundation models (timm / Hugging Face hub; extra ``hub``).

Each builder takes the exact ``timm.create_model`` arguments of the model card. With
``pretrained=False`` it builds the same architecture from timm's local definitions (random init,
no network), which is also what a local checkpoint (``--weights FILE`` or
``$SLIDEMIL_WEIGHTS_DIR``) is loaded into. Most of these weights are gated on Hugging Face:
accept the terms on the model page and set ``HF_TOKEN``.
"""

from __future__ import annotations

from typing import Any

from slidemil.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Transform,
    WeightsSource,
    register_encoder,
)
from slidemil.encoders.weights import require

HUB = "hub"
CC_BY_NC_ND = "CC-BY-NC-ND-4.0 (academic research, gated)"
VIT_224 = Transform(resize=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def _timm(name: str, what: str, pretrained: bool, hub_id: str, **kwargs: Any) -> Any:
    """``timm.create_model(hub_id, pretrained=True, **kwargs)`` or the local architecture."""
    timm = require("timm", HUB, what)
    if pretrained:
        return timm.create_model(hub_id, pretrained=True, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _swiglu_kwargs() -> dict[str, Any]:
    import torch

    timm = require("timm", HUB, "SwiGLU ViTs")
    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


@register_encoder(
    "uni",
    output_dim=1024,
    transform=VIT_224,
    weights=WeightsSource("timm-hub", "hf-hub:MahmoodLab/UNI"),
    licence=CC_BY_NC_ND,
    gated=True,
    hf_id="MahmoodLab/UNI",
    extra=HUB,
    params_millions=303,
    expensive=True,
    tags=("vit", "pathology"),
)
def uni(pretrained: bool = False) -> Any:
    """UNI (Mahmood lab): ViT-L/16 DINOv2 on 100k slides, class token (1024-d)."""
    return _timm(
        "vit_large_patch16_224", "UNI", pretrained, "hf-hub:MahmoodLab/UNI",
        img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True,
    )  # fmt: skip


@register_encoder(
    "uni2-h",
    output_dim=1536,
    transform=VIT_224,
    weights=WeightsSource("timm-hub", "hf-hub:MahmoodLab/UNI2-h"),
    licence=CC_BY_NC_ND,
    gated=True,
    hf_id="MahmoodLab/UNI2-h",
    extra=HUB,
    params_millions=681,
    expensive=True,
    tags=("vit", "pathology"),
)
def uni2_h(pretrained: bool = False) -> Any:
    """UNI2-h (Mahmood lab): ViT-H/14 with 8 registers and SwiGLU, class token (1536-d)."""
    return _timm(
        "vit_giant_patch14_224", "UNI2-h", pretrained, "hf-hub:MahmoodLab/UNI2-h",
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
        dynamic_img_size=True, **_swiglu_kwargs(),
    )  # fmt: skip


def _class_and_mean_patch_tokens(model: Any, skip_tokens: int) -> Any:
    """Wrap a token-returning ViT: [class token, mean of patch tokens] (Virchow's embedding)."""
    import torch

    class ClassAndMeanTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.vit(x)  # (B, 1 + registers + patches, C)
            return torch.cat([tokens[:, 0], tokens[:, skip_tokens:].mean(1)], dim=-1)

    return ClassAndMeanTokens()


@register_encoder(
    "virchow2",
    output_dim=2560,
    transform=VIT_224,
    weights=WeightsSource("timm-hub", "hf-hub:paige-ai/Virchow2"),
    licence=CC_BY_NC_ND,
    gated=True,
    hf_id="paige-ai/Virchow2",
    extra=HUB,
    params_millions=632,
    expensive=True,
    tags=("vit", "pathology"),
)
def virchow2(pretrained: bool = False) -> Any:
    """Virchow2 (Paige): ViT-H/14, 4 registers; class token + mean patch token (2560-d)."""
    if pretrained:
        vit = _timm("", "Virchow2", True, "hf-hub:paige-ai/Virchow2", **_swiglu_kwargs())
    else:
        vit = _timm(
            "vit_huge_patch14_224", "Virchow2", False, "",
            img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
            dynamic_img_size=True, reg_tokens=4, no_embed_class=True, **_swiglu_kwargs(),
        )  # fmt: skip
    return _class_and_mean_patch_tokens(vit, skip_tokens=1 + 4)


@register_encoder(
    "h-optimus-0",
    output_dim=1536,
    transform=Transform(resize=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    weights=WeightsSource("timm-hub", "hf-hub:bioptimus/H-optimus-0"),
    licence="Apache-2.0",
    gated=False,
    hf_id="bioptimus/H-optimus-0",
    extra=HUB,
    params_millions=1134,
    autocast_dtype="float16",
    expensive=True,
    tags=("vit", "pathology"),
)
def h_optimus_0(pretrained: bool = False) -> Any:
    """H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, class token (1536-d)."""
    if pretrained:
        return _timm(
            "", "H-optimus-0", True, "hf-hub:bioptimus/H-optimus-0",
            init_values=1e-5, dynamic_img_size=False,
        )  # fmt: skip
    return _timm(
        "vit_giant_patch14_reg4_dinov2", "H-optimus-0", False, "",
        img_size=224, init_values=1e-5, num_classes=0, global_pool="token",
        dynamic_img_size=False,
    )  # fmt: skip


@register_encoder(
    "prov-gigapath",
    output_dim=1536,
    transform=Transform(resize=256, crop=224, interpolation="bicubic"),
    weights=WeightsSource("timm-hub", "hf_hub:prov-gigapath/prov-gigapath"),
    licence="Apache-2.0 (gated)",
    gated=True,
    hf_id="prov-gigapath/prov-gigapath",
    extra=HUB,
    params_millions=1134,
    expensive=True,
    tags=("vit", "pathology"),
)
def prov_gigapath(pretrained: bool = False) -> Any:
    """Prov-GigaPath tile encoder: ViT-g/14 DINOv2, class token (1536-d)."""
    if pretrained:
        return _timm("", "Prov-GigaPath", True, "hf_hub:prov-gigapath/prov-gigapath")
    return _timm(
        "vit_giant_patch14_dinov2", "Prov-GigaPath", False, "",
        img_size=224, in_chans=3, num_classes=0, global_pool="token",
    )  # fmt: skip


def _hf_class_token(hf_id: str, what: str, pretrained: bool, config_factory: Any) -> Any:
    """A Hugging Face ``transformers`` ViT returning its class token."""
    import torch

    transformers = require("transformers", None, what)
    if pretrained:
        backbone = transformers.AutoModel.from_pretrained(hf_id)
    else:
        backbone = transformers.AutoModel.from_config(config_factory(transformers))

    class ClassToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(pixel_values=x).last_hidden_state[:, 0]

    return ClassToken()


@register_encoder(
    "phikon",
    output_dim=768,
    transform=VIT_224,
    weights=WeightsSource("hf-transformers", "hf:owkin/phikon"),
    licence="Owkin non-commercial licence",
    hf_id="owkin/phikon",
    extra="transformers",
    params_millions=86,
    tags=("vit", "pathology"),
)
def phikon(pretrained: bool = False) -> Any:
    """Phikon (Owkin): ViT-B/16 iBOT on TCGA, class token (768-d); needs ``transformers``."""
    return _hf_class_token(
        "owkin/phikon", "Phikon", pretrained, lambda t: t.ViTConfig(image_size=224, patch_size=16)
    )


@register_encoder(
    "phikon-v2",
    output_dim=1024,
    transform=VIT_224,
    weights=WeightsSource("hf-transformers", "hf:owkin/phikon-v2"),
    licence="Owkin non-commercial licence",
    hf_id="owkin/phikon-v2",
    extra="transformers",
    params_millions=303,
    expensive=True,
    tags=("vit", "pathology"),
)
def phikon_v2(pretrained: bool = False) -> Any:
    """Phikon-v2 (Owkin): ViT-L/16 DINOv2, class token (1024-d); needs ``transformers``."""
    return _hf_class_token(
        "owkin/phikon-v2", "Phikon-v2", pretrained,
        lambda t: t.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 patch_size=16, image_size=224),
    )  # fmt: skip


@register_encoder(
    "conch",
    output_dim=512,
    transform=Transform(
        resize=448, crop=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic"
    ),
    weights=WeightsSource("package", "hf_hub:MahmoodLab/conch"),
    licence=CC_BY_NC_ND,
    gated=True,
    hf_id="MahmoodLab/conch",
    extra="conch",
    params_millions=90,
    tags=("vit", "pathology", "vision-language"),
)
def conch(pretrained: bool = False) -> Any:
    """CONCH (Mahmood lab) image tower, un-projected embedding (512-d); needs the conch package
    (pip install git+https://github.com/Mahmoodlab/CONCH.git)."""
    import torch

    require("conch", None, "CONCH (pip install git+https://github.com/Mahmoodlab/CONCH.git)")
    from conch.open_clip_custom import create_model_from_pretrained

    source = "hf_hub:MahmoodLab/conch" if pretrained else None
    model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=source)

    class ConchImage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_image(x, proj_contrast=False, normalize=False)

    return ConchImage()
