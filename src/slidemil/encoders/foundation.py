"""Pathology foundation models (timm / Hugging Face hub; extra ``hub``).

Each builder takes the exact architecture arguments of the model card (checked against the
``config.json`` the authors publish and TRIDENT's local-checkpoint loaders). With
``pretrained=False`` it builds the same architecture from timm's or ``transformers``' local
definitions (random init, no network), which is also what a local checkpoint (``--weights FILE``
or ``$SLIDEMIL_WEIGHTS_DIR``) is loaded into. Most of these weights are gated on Hugging Face:
accept the terms on the model page and set ``HF_TOKEN``. Builders work under a
``torch.device("meta")`` context, so tests verify every architecture without memory or time.
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
VIT_224_BICUBIC = Transform(resize=224, interpolation="bicubic")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


def _timm(
    name: str, what: str, pretrained: bool, hub_id: str, revision: str | None, **kwargs: Any
) -> Any:
    """``timm.create_model(hub_id[@revision], pretrained=True, **kwargs)`` or the local
    architecture."""
    timm = require("timm", HUB, what)
    if pretrained:
        source = f"{hub_id}@{revision}" if revision else hub_id  # timm's hub-id revision syntax
        return timm.create_model(source, pretrained=True, **kwargs)
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
def uni(pretrained: bool = False, revision: str | None = None) -> Any:
    """UNI (Mahmood lab): ViT-L/16 DINOv2 on 100k slides, class token (1024-d)."""
    return _timm(
        "vit_large_patch16_224", "UNI", pretrained, "hf-hub:MahmoodLab/UNI", revision,
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
def uni2_h(pretrained: bool = False, revision: str | None = None) -> Any:
    """UNI2-h (Mahmood lab): ViT-H/14 with 8 registers and SwiGLU, class token (1536-d)."""
    return _timm(
        "vit_giant_patch14_224", "UNI2-h", pretrained, "hf-hub:MahmoodLab/UNI2-h", revision,
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

        @property
        def checkpoint_module(self) -> torch.nn.Module:
            return self.vit  # the published checkpoint is the bare timm ViT

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.vit(x)  # (B, 1 + registers + patches, C)
            return torch.cat([tokens[:, 0], tokens[:, skip_tokens:].mean(1)], dim=-1)

    return ClassAndMeanTokens()


@register_encoder(
    "virchow2",
    output_dim=2560,
    transform=VIT_224_BICUBIC,
    weights=WeightsSource("timm-hub", "hf-hub:paige-ai/Virchow2"),
    licence=CC_BY_NC_ND,
    gated=True,
    hf_id="paige-ai/Virchow2",
    extra=HUB,
    params_millions=632,
    autocast_dtype="float16",
    expensive=True,
    tags=("vit", "pathology"),
)
def virchow2(pretrained: bool = False, revision: str | None = None) -> Any:
    """Virchow2 (Paige): ViT-H/14, 4 registers; class token + mean patch token (2560-d)."""
    # config.json: vit_huge_patch14_224, mlp_ratio 5.3375, reg_tokens 4, position embeddings
    # over the class and register tokens too (no ``no_embed_class``), tokens out (global_pool "").
    vit = _timm(
        "vit_huge_patch14_224", "Virchow2", pretrained, "hf-hub:paige-ai/Virchow2", revision,
        img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, reg_tokens=4,
        global_pool="", dynamic_img_size=True, **_swiglu_kwargs(),
    )  # fmt: skip
    return _class_and_mean_patch_tokens(vit, skip_tokens=1 + 4)


@register_encoder(
    "h-optimus-0",
    output_dim=1536,
    transform=Transform(resize=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    weights=WeightsSource("timm-hub", "hf-hub:bioptimus/H-optimus-0"),
    licence="Apache-2.0 (gated, automatic approval)",
    gated=True,
    hf_id="bioptimus/H-optimus-0",
    extra=HUB,
    params_millions=1134,
    autocast_dtype="float16",
    expensive=True,
    tags=("vit", "pathology"),
)
def h_optimus_0(pretrained: bool = False, revision: str | None = None) -> Any:
    """H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, class token (1536-d)."""
    # config.json: vit_giant_patch14_reg4_dinov2 (SwiGLU, registers, no_embed_class), 224 px.
    return _timm(
        "vit_giant_patch14_reg4_dinov2", "H-optimus-0", pretrained,
        "hf-hub:bioptimus/H-optimus-0", revision,
        img_size=224, init_values=1e-5, num_classes=0, global_pool="token",
        dynamic_img_size=False,
    )  # fmt: skip


@register_encoder(
    "prov-gigapath",
    output_dim=1536,
    transform=Transform(resize=256, crop=224, interpolation="bicubic"),
    weights=WeightsSource("timm-hub", "hf-hub:prov-gigapath/prov-gigapath"),
    licence="Prov-GigaPath licence (research use, gated)",
    gated=True,
    hf_id="prov-gigapath/prov-gigapath",
    extra=HUB,
    params_millions=1134,
    autocast_dtype="float16",
    expensive=True,
    tags=("vit", "pathology"),
)
def prov_gigapath(pretrained: bool = False, revision: str | None = None) -> Any:
    """Prov-GigaPath tile encoder: ViT-g DINOv2 with 16 px patches, class token (1536-d)."""
    # config.json overrides the timm entry's 14 px patches with 16 (14 x 14 tokens at 224 px).
    return _timm(
        "vit_giant_patch14_dinov2", "Prov-GigaPath", pretrained,
        "hf-hub:prov-gigapath/prov-gigapath", revision,
        img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
        init_values=1e-5, mlp_ratio=5.33334, num_classes=0, global_pool="token",
    )  # fmt: skip


def _hf_class_token(
    what: str, pretrained: bool, hf_id: str, build: Any, revision: str | None = None
) -> Any:
    """A Hugging Face ``transformers`` ViT returning its class token (``last_hidden_state[:, 0]``).

    ``build(transformers, pretrained, revision)`` makes the backbone: ``from_pretrained`` (at
    ``revision``) or from a config.
    """
    import torch

    transformers = require("transformers", "transformers", what)
    backbone = build(transformers, pretrained, revision)

    class ClassToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        @property
        def checkpoint_module(self) -> torch.nn.Module:
            return self.backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(pixel_values=x).last_hidden_state[:, 0]

    return ClassToken()


def _phikon_backbone(transformers: Any, pretrained: bool, revision: str | None) -> Any:
    # The model card loads ViTModel without its pooler; only the class token is used.
    if pretrained:
        return transformers.ViTModel.from_pretrained(
            "owkin/phikon", add_pooling_layer=False, revision=revision
        )
    config = transformers.ViTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=224, patch_size=16, qkv_bias=True,
    )  # fmt: skip
    return transformers.ViTModel(config, add_pooling_layer=False)


def _phikon_v2_backbone(transformers: Any, pretrained: bool, revision: str | None) -> Any:
    if pretrained:
        return transformers.AutoModel.from_pretrained("owkin/phikon-v2", revision=revision)
    config = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
        patch_size=16, image_size=224, layerscale_value=1e-5, layer_norm_eps=1e-6,
    )  # fmt: skip
    return transformers.Dinov2Model(config)


@register_encoder(
    "phikon",
    output_dim=768,
    transform=VIT_224,
    weights=WeightsSource("hf-transformers", "hf:owkin/phikon", ignored_keys=("pooler.",)),
    licence="Owkin non-commercial licence",
    hf_id="owkin/phikon",
    extra="transformers",
    params_millions=86,
    autocast_dtype=None,
    tags=("vit", "pathology"),
)
def phikon(pretrained: bool = False, revision: str | None = None) -> Any:
    """Phikon (Owkin): ViT-B/16 iBOT on TCGA, class token (768-d); needs ``transformers``."""
    return _hf_class_token("Phikon", pretrained, "owkin/phikon", _phikon_backbone, revision)


@register_encoder(
    "phikon-v2",
    output_dim=1024,
    transform=VIT_224,
    weights=WeightsSource("hf-transformers", "hf:owkin/phikon-v2", ignored_keys=("mask_token",)),
    licence="Owkin non-commercial licence",
    hf_id="owkin/phikon-v2",
    extra="transformers",
    params_millions=303,
    autocast_dtype=None,
    expensive=True,
    tags=("vit", "pathology"),
)
def phikon_v2(pretrained: bool = False, revision: str | None = None) -> Any:
    """Phikon-v2 (Owkin): ViT-L/16 DINOv2, class token (1024-d); needs ``transformers``."""
    return _hf_class_token(
        "Phikon-v2", pretrained, "owkin/phikon-v2", _phikon_v2_backbone, revision
    )


# CONCH's checkpoint is the whole CoCa model; the image embedding needs only these parts.
CONCH_UNUSED = (
    "text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.", "visual.ln_caption.",
    "visual.proj_contrast", "visual.head.",
)  # fmt: skip


@register_encoder(
    "conch",
    output_dim=512,
    transform=Transform(
        resize=448, crop=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic"
    ),
    weights=WeightsSource("hf-file", "MahmoodLab/conch/pytorch_model.bin", CONCH_UNUSED),
    licence=CC_BY_NC_ND,
    gated=True,
    hf_id="MahmoodLab/conch",
    extra=HUB,
    params_millions=88,
    autocast_dtype=None,
    expensive=True,
    tags=("vit", "pathology", "vision-language"),
)
def conch(pretrained: bool = False) -> Any:
    """CONCH (Mahmood lab) image tower: ViT-B/16 at 448 px, attention-pooled embedding (512-d).

    The embedding before the contrastive projection, as the CONCH package's
    ``encode_image(proj_contrast=False, normalize=False)`` gives it (and TRIDENT stores); built
    from timm and torch alone, so the ``conch`` package is not needed.
    """
    import torch

    timm = require("timm", HUB, "CONCH")

    class AttentionalPool(torch.nn.Module):
        """Learned queries cross-attending to the ViT tokens (CoCa's attentional pooler)."""

        def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
            super().__init__()
            self.query = torch.nn.Parameter(torch.randn(queries, dim))
            self.attn = torch.nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
            self.ln_q = torch.nn.LayerNorm(dim)
            self.ln_k = torch.nn.LayerNorm(context_dim)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            keys = self.ln_k(tokens).permute(1, 0, 2)  # (L, B, C): MultiheadAttention's layout
            query = self.ln_q(self.query).unsqueeze(1).expand(-1, keys.shape[1], -1)
            return self.attn(query, keys, keys, need_weights=False)[0].permute(1, 0, 2)

    class ConchVision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = timm.models.VisionTransformer(
                img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                num_classes=0, dynamic_img_size=True,
            )  # fmt: skip
            self.attn_pool_contrast = AttentionalPool(512, 768, heads=8, queries=1)
            self.ln_contrast = torch.nn.LayerNorm(512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.trunk.forward_features(x)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    # Built locally in both cases: the hub file is loaded into it by the weights layer.
    return ConchVision()
