"""Hybrid Vision Transformers (Dosovitskiy et al., 2021, section 3.1): a ResNet stem, then a ViT.

What the hybrid adds to ViT is where its tokens come from: the patch embedding
(:class:`~vitlab.components.hybrid_embed.HybridEmbed`) projects the feature map of a ResNet v2
(:mod:`vitlab.models.resnetv2`) instead of image patches. The projection's ``patch_size`` is
counted on that map (1 for the R50 / R26 hybrids, 8 for R+ViT-Ti's stem-only CNN), so a token
covers ``CNN stride x patch_size`` pixels: 16 for ``*_r50_s16_*``, 32 for ``*_s32_*`` and
``*_r_s16_p8_*`` (stem stride 4 x patch 8). ``feature_info``, ``token_layout`` and the position
embedding's grid all use that token stride, and everything else (prefix tokens, any input
size with the position embedding resampled, intermediates, attention capture) is ViT's.

State-dict keys are timm's (``patch_embed.backbone.stem.conv.weight``,
``patch_embed.backbone.stages.0.blocks.0.conv1.weight``, ``patch_embed.proj.weight``,
``cls_token``, ``pos_embed``, ``blocks.N...``), so timm hybrid checkpoints load unconverted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..components.hybrid_embed import HybridEmbed
from .base import INCEPTION_MEAN, INCEPTION_STD, check_config, pretrained_cfg
from .registry import register_family
from .resnetv2 import bottleneck_width, resnetv2_backbone
from .vit import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class ViTHybridConfig(ViTConfig):
    """:class:`ViTConfig` plus the ResNet v2 that makes the tokens.

    ``patch_size`` is the projection's kernel on the CNN's map (default 1), not a pixel patch.

    Attributes:
        backbone_layers: Bottlenecks per ResNet stage (R50 hybrid: (3, 4, 9), stride 16; R26:
            (2, 2, 2, 2), stride 32); ``()`` for the stem alone (stride 4).
        backbone_widths: Output channels per stage (the first ``len(backbone_layers)`` are used).
        stem_width: Channels of the stem convolution.
        norm_groups: GroupNorm groups in the CNN (32 in every hybrid; every CNN width and
            bottleneck width must be divisible by it).
    """

    patch_size: int = 1
    backbone_layers: tuple[int, ...] = (3, 4, 9)
    backbone_widths: tuple[int, ...] = (256, 512, 1024, 2048)
    stem_width: int = 64
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbone_layers", tuple(self.backbone_layers))
        object.__setattr__(self, "backbone_widths", tuple(self.backbone_widths))
        super().__post_init__()
        widths = self.backbone_widths[: len(self.backbone_layers)]
        grouped = [self.stem_width, *widths, *(bottleneck_width(w) for w in widths)]
        check_config(
            self,
            positive=("backbone_layers", "backbone_widths", "stem_width", "norm_groups"),
            checks=[
                (len(self.backbone_widths) >= len(self.backbone_layers),
                 f"backbone_widths {self.backbone_widths} needs a width for each of the {len(self.backbone_layers)} "
                 f"stages of backbone_layers {self.backbone_layers}"),
                (self.norm_groups <= 0 or all(w % self.norm_groups == 0 for w in grouped),
                 f"every CNN width (stem {self.stem_width}, stages {widths}, bottlenecks "
                 f"{tuple(bottleneck_width(w) for w in widths)}) must be divisible by norm_groups ({self.norm_groups})"),
                (self.patch_embed == "conv", f"a hybrid ViT projects the CNN map with a convolution: patch_embed must "
                                             f"be 'conv', got {self.patch_embed!r}"),
            ],
        )

    @property
    def stride(self) -> int:
        """Input pixels per token: the CNN's stride (4, x2 per stage after the first) times ``patch_size``."""
        return 4 * 2 ** max(len(self.backbone_layers) - 1, 0) * self.patch_size


class ViTHybrid(VisionTransformer):
    """A :class:`VisionTransformer` whose patch embedding is a ResNet v2 and a projection of its map.

    Args:
        config: A :class:`ViTHybridConfig`; keyword arguments override its fields.

    Masked image modelling is refused (:meth:`reject_mask`): the CNN sees the whole image
    before any token exists, so hidden patches cannot be dropped before it. Activation
    checkpointing (``set_grad_checkpointing``) covers the transformer blocks; the CNN keeps
    its activations. Stochastic depth (``drop_path``) applies to the transformer blocks only,
    as in timm's hybrids.

    Example:
        >>> model = ViTHybrid(ViTHybridConfig(image_size=64, dim=32, depth=1, heads=2, mlp_dim=64, num_classes=3,
        ...                                   backbone_layers=(1, 1), backbone_widths=(32, 64), stem_width=16,
        ...                                   norm_groups=4))
        >>> model(torch.randn(1, 3, 64, 64)).shape, model.feature_info[0]["reduction"]
        (torch.Size([1, 3]), 8)
    """

    family = "vit_hybrid"
    config_class = ViTHybridConfig

    def build_patch_embed(self, c: ViTHybridConfig) -> HybridEmbed:
        """The ResNet v2 (:func:`~vitlab.models.resnetv2.resnetv2_backbone`) under a :class:`HybridEmbed`."""
        cnn, channels, stride = resnetv2_backbone(c.backbone_layers, c.backbone_widths, c.in_channels, c.stem_width,
                                                  c.norm_groups)
        return HybridEmbed(cnn, channels, stride, c.patch_size, c.in_channels, c.dim, bias=c.patch_bias,
                           pad_input=c.pad_input)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image -> normed tokens (B, P + N, C), prefix tokens first; a ``mask`` is refused (:meth:`reject_mask`)."""
        self.reject_mask(mask)
        return super().forward_features(x)

    def reject_mask(self, mask: Tensor | None) -> None:
        """The one error for a patch mask, with the hybrid's reason (see :meth:`Backbone.reject_mask`)."""
        if mask is None:
            return
        try:
            super().reject_mask(mask)
        except ValueError as err:
            raise ValueError(
                f"{err}. A hybrid ViT's tokens come from a CNN that sees the whole image, so hidden patches "
                f"cannot be dropped before it"
            ) from None

    @classmethod
    def tiny_overrides(cls, config: ViTHybridConfig) -> dict:
        """ViT's tiny transformer on the same CNN shape: as many stages (the same token stride and
        patch size), one bottleneck each, widths 32/32/64/64, a 16-wide stem, 4 GroupNorm groups."""
        out = super().tiny_overrides(config)
        n = len(config.backbone_layers)
        s = config.stride
        return dict(out, image_size=(4 * s, 3 * s), backbone_layers=(1,) * n, backbone_widths=(32, 32, 64, 64)[:n] or (32,),
                    stem_width=16, norm_groups=4)


_IN = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)
_TI = dict(patch_size=8, dim=192, depth=12, heads=3, mlp_dim=768, backbone_layers=())
_S = dict(dim=384, depth=12, heads=6, mlp_dim=1536, backbone_layers=(2, 2, 2, 2))
_B26 = dict(dim=768, depth=12, heads=12, mlp_dim=3072, backbone_layers=(2, 2, 2, 2))
_B = dict(dim=768, depth=12, heads=12, mlp_dim=3072, backbone_layers=(3, 4, 9))
_L = dict(dim=1024, depth=24, heads=16, mlp_dim=4096, backbone_layers=(3, 4, 6, 3))


def _variant(values: dict, size: int, hub: str | None) -> tuple[dict, dict]:
    """(config values, pretrained_cfg) of a variant at ``size`` pixels with timm's hub weights ``hub``."""
    pcfg = pretrained_cfg(input_size=size, crop_pct=1.0 if size == 384 else 0.9,
                          hub_id=f"timm/{hub}" if hub else None, **_IN)
    return dict(values, image_size=size), pcfg


register_family(
    "vit_hybrid",
    ViTHybrid,
    ViTHybridConfig,
    {
        "vit_tiny_r_s16_p8_224": _variant(_TI, 224, "vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k"),
        "vit_tiny_r_s16_p8_384": _variant(_TI, 384, "vit_tiny_r_s16_p8_384.augreg_in21k_ft_in1k"),
        "vit_small_r26_s32_224": _variant(_S, 224, "vit_small_r26_s32_224.augreg_in21k_ft_in1k"),
        "vit_small_r26_s32_384": _variant(_S, 384, "vit_small_r26_s32_384.augreg_in21k_ft_in1k"),
        "vit_base_r26_s32_224": _variant(_B26, 224, None),  # timm has no weights for it
        # timm's only weights: in21k features without a classifier (the head loads fresh, with a warning)
        "vit_base_r50_s16_224": _variant(_B, 224, "vit_base_r50_s16_224.orig_in21k"),
        "vit_base_r50_s16_384": _variant(_B, 384, "vit_base_r50_s16_384.orig_in21k_ft_in1k"),
        "vit_large_r50_s32_224": _variant(_L, 224, "vit_large_r50_s32_224.augreg_in21k_ft_in1k"),
        "vit_large_r50_s32_384": _variant(_L, 384, "vit_large_r50_s32_384.augreg_in21k_ft_in1k"),
    },
)

__all__ = ["ViTHybrid", "ViTHybridConfig"]
