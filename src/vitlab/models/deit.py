"""DeiT (Touvron et al., 2021): ViT trained data-efficiently, with an optional distillation token.

What the paper adds to ViT is the distillation token: a second learned token beside the
class token, with its own head, trained to match a teacher's predictions. In training both
heads' logits are returned; in eval they are averaged. Non-distilled DeiT models are
ViTs with DeiT's preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import classifier_head, pretrained_cfg
from .registry import register_family
from .vit import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class DeiTConfig(ViTConfig):
    """:class:`ViTConfig` for the distilled DeiT (class token pooling is required)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool != "cls" or not self.class_token:
            raise ValueError("a distilled DeiT pools the class and distillation tokens: use pool='cls', class_token=True")


class DistilledVisionTransformer(VisionTransformer):
    """ViT with a distillation token and a second head (``head_dist``).

    ``forward`` returns ``(logits_cls, logits_dist)`` in training mode (while
    ``distilled_training`` is True) and their mean in eval mode.
    """

    family = "deit"
    config_class = DeiTConfig
    num_distill_tokens = 1
    classifier_names = ("head", "head_dist")
    head_names = ("head", "head_dist")

    def __init__(self, config: DeiTConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        c = self.config
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.head_dist = classifier_head(self.num_features, c.num_classes)
        self.distilled_training = True
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0], crop_pct=0.875)

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return both heads' logits in training mode (True) or their mean (False)."""
        self.distilled_training = enable

    def prefix_tokens(self, batch: int) -> list[Tensor]:
        return [self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1)]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens -> mean of both heads (eval) or ``(cls_logits, dist_logits)`` (training)."""
        x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x_cls + x_dist) / 2
        x_cls, x_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.training and self.distilled_training:
            return x_cls, x_dist
        return (x_cls + x_dist) / 2


_SIZES = {
    "tiny": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "small": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
    "base": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
}

register_family(
    "deit_plain",
    VisionTransformer,
    ViTConfig,
    {
        f"deit_{size}_patch16_224": (kw, pretrained_cfg(crop_pct=0.875, hub_id=f"timm/deit_{size}_patch16_224.fb_in1k"))
        for size, kw in _SIZES.items()
    },
)
register_family(
    "deit",
    DistilledVisionTransformer,
    DeiTConfig,
    {
        f"deit_{size}_distilled_patch16_224": (
            kw, pretrained_cfg(crop_pct=0.875, hub_id=f"timm/deit_{size}_distilled_patch16_224.fb_in1k")
        )
        for size, kw in _SIZES.items()
    },
)
