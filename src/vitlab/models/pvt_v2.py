"""PVT v2 (Wang et al., 2022, "PVT v2: Improved Baselines with Pyramid Vision Transformer").

What v2 adds to PVT v1 (see :mod:`vitlab.models.pyramid` for the shared pyramid and
spatial-reduction attention): overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2),
a convolutional feed-forward network (a depth-wise 3x3 convolution on the hidden tokens,
:class:`~vitlab.models.pyramid.DepthwiseConv`, plugged into :class:`~vitlab.components.Mlp` as
its ``mid`` hook; the linear variant puts a ReLU before it), a LayerNorm after every stage, no
position embedding, global average pooling.

State-dict keys follow timm's ``pvt_v2`` layout (``patch_embed``, ``stages.N.downsample``,
``stages.N.blocks.M.attn.{q,kv,sr,norm,proj}``, ``stages.N.norm``, ``head``) except that the
depth-wise convolution is ``mlp.mid.dwconv`` (timm: ``mlp.dwconv``). Converters for timm, the
official code and Hugging Face transformers live in :mod:`vitlab.pretrained.convert_pvt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..components import PatchEmbed, drop_path_rates, tokens_to_map
from .base import GroupMatcher, IntermediateResult, classifier_head, config_errors, init_linears, pretrained_cfg
from .pyramid import PyramidBackbone, PyramidConfig, sra_block
from .masking import fill_masked_tokens
from .registry import register_family


@dataclass(frozen=True)
class PvtV2Config(PyramidConfig):
    """Configuration of a :class:`PyramidVisionTransformerV2` (see :class:`PyramidConfig`).

    Attributes:
        linear: Linear spatial-reduction attention (``_li`` variants): keys/values from the
            grid average-pooled to 7x7 (1x1 conv, LayerNorm, GELU) in every stage, and a ReLU
            before the MLP's depth-wise convolution; ``sr_ratios`` are then unused.
        head_dropout: Dropout before the classifier.
        mask_token: Own a learned mask token, so ``forward_features(x, mask)`` takes a patch
            mask (SimMIM pre-training); off for classifiers, whose checkpoints then carry no
            unused parameter.
    """

    linear: bool = False
    head_dropout: float = 0.0
    mask_token: bool = False

    @property
    def first_stride(self) -> int:
        return 4

    def min_stage_grids(self) -> list[int]:
        return [1] * self.num_stages if self.linear else super().min_stage_grids()

    def min_image_size(self) -> int:
        return max(super().min_image_size(), 7)  # the 7x7 stem convolution

    def validate(self) -> list[str]:
        return super().validate() + config_errors(self, rates=("head_dropout",))


class PvtV2Stage(nn.Module):
    """One PVT v2 stage: [overlapping 3x3 stride-2 patch embedding], blocks, LayerNorm."""

    def __init__(self, c: PvtV2Config, index: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        if index > 0:
            self.downsample: PatchEmbed | None = PatchEmbed(
                3, c.dims[index - 1], c.dims[index], stride=2, norm_layer=partial(nn.LayerNorm, eps=c.local_norm_eps)
            )
        else:
            self.downsample = None
        self.blocks = nn.ModuleList(sra_block(c, index, r, linear=c.linear, conv_mlp=True) for r in drop_paths)
        self.norm = nn.LayerNorm(c.dims[index], eps=c.norm_eps)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Previous stage's map (B, C_in, H, W) -> tokens (B, H/2 * W/2, C), grid."""
        return self.downsample(x)


class PyramidVisionTransformerV2(PyramidBackbone):
    """PVT v2 classifier/backbone (overlapping patch embedding, SRA, convolutional MLP).

    Args:
        config: A :class:`PvtV2Config`; keyword arguments override its fields.

    Example:
        >>> model = PyramidVisionTransformerV2(PvtV2Config(dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), image_size=64))
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    family = "pvt_v2"
    config_class = PvtV2Config
    no_weight_decay_names = ("mask_token",)

    def __init__(self, config: PvtV2Config | None = None, **overrides) -> None:
        super().__init__(config, overrides)
        c = self.config
        self.patch_embed = PatchEmbed(
            7, c.in_channels, c.dims[0], stride=4, norm_layer=partial(nn.LayerNorm, eps=c.local_norm_eps)
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dims[0])) if c.mask_token else None
        rates = drop_path_rates(c.drop_path, c.depths)
        self.stages = nn.ModuleList(PvtV2Stage(c, i, rates[i]) for i in range(c.num_stages))
        self.num_features = c.dims[-1]
        self.head_drop = nn.Dropout(c.head_dropout)
        self.head = classifier_head(self.num_features, c.num_classes)
        self.feature_info = [
            dict(num_chs=c.dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(c.num_stages)
        ]
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0])
        self.init_weights()

    def init_weights(self) -> None:
        """timm's scheme: truncated normal (std 0.02) linears; convolutions N(0, sqrt(2 / fan_out))."""
        init_linears(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def run_stages(self, x: Tensor, last: int | None = None,
                   mask: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(stage index, output map (B, C, H, W))`` for stages 0..last.

        With a ``mask`` (B, N) over the first patch grid, the hidden patch embeddings are
        replaced by the mask token before the first stage (SimMIM).
        """
        x = self.check_input(x, self.patch_embed)
        tokens, grid = self.patch_embed(x)  # (B, H/4 * W/4, C)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError(f"{type(self).__name__} was built without a mask token: create it with "
                                 "mask_token=True to call forward_features(x, mask=...)")
            tokens = fill_masked_tokens(tokens, mask, self.mask_token)
        last = len(self.stages) - 1 if last is None else last
        for i in range(last + 1):
            stage = self.stages[i]
            if i > 0:
                tokens, grid = stage.embed(x)
            tokens = stage.norm(self.run_blocks(stage.blocks, tokens, grid))
            x = tokens_to_map(tokens, grid)
            yield i, x

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image -> the last stage's normed map (B, C, H/32, W/32).

        ``mask`` (B, N) over the first patch grid (True: hidden) puts the learned mask token
        at the hidden patches (SimMIM); the model must be built with ``mask_token=True``.
        """
        for _, x in self.run_stages(x, mask=mask):
            pass
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Map (B, C, H, W) -> global average pool -> dropout -> logits (or the pooled features)."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Stage output maps (B, C_i, H/s_i, W/s_i) at strides 4, 8, 16, 32, and the final map.

        ``norm`` changes nothing: every stage output is already normed by its stage LayerNorm
        (that is the map the next stage embeds).
        """
        maps = []
        for i, fmap in self.run_stages(x, last=take[-1] if stop_early else None):
            if i in take:
                maps.append(fmap)  # the map the next stage embeds: on the forward path as it is
        return None if stop_early else fmap, maps

    # ------------------------------------------------------------- contract
    def group_matcher(self) -> GroupMatcher:
        """Stem: the first patch embedding; a block per group, a stage's patch embedding with its
        first block and its norm with its last."""
        depths = self.config.depths
        norms = [(rf"^stages\.{s}\.norm", (s, d - 1)) for s, d in enumerate(depths)]
        return dict(stem=r"^(patch_embed|mask_token)", blocks=[(r"^stages\.(\d+)\.(?:blocks\.(\d+)|downsample)", None), *norms])

    def stage_blocks(self, i: int) -> nn.ModuleList:
        return self.stages[i].blocks

    def block_module_name(self, stage: int, block: int) -> str:
        return f"stages.{stage}.blocks.{block}"

    @classmethod
    def tiny_overrides(cls, config: PvtV2Config) -> dict:
        """Same heads, ratios and attention kind; width 4 per head, at most 2 blocks per stage,
        a 64x48 input (stage grids 16x12, 8x6, 4x3, 2x2)."""
        return dict(dims=tuple(4 * h for h in config.heads), depths=tuple(min(d, 2) for d in config.depths),
                    image_size=(64, 48))



_V2 = dict(heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1))
_V2_VARIANTS = {
    "pvt_v2_b0": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4)),
    "pvt_v2_b1": dict(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4)),
    "pvt_v2_b2": dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), mlp_ratios=(8, 8, 4, 4)),
    "pvt_v2_b2_li": dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), mlp_ratios=(8, 8, 4, 4), linear=True),
    "pvt_v2_b3": dict(dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), mlp_ratios=(8, 8, 4, 4)),
    "pvt_v2_b4": dict(dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), mlp_ratios=(8, 8, 4, 4)),
    "pvt_v2_b5": dict(dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}

register_family(
    "pvt_v2",
    PyramidVisionTransformerV2,
    PvtV2Config,
    {name: ({**_V2, **kw}, pretrained_cfg(hub_id=f"timm/{name}.in1k")) for name, kw in _V2_VARIANTS.items()},
)
