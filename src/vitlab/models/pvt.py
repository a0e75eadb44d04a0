"""PVT v1 (Wang et al., 2021, "Pyramid Vision Transformer").

A four-stage pyramid of non-overlapping patch embeddings (4x4, then 2x2) and
spatial-reduction attention (see :mod:`vitlab.models.pyramid`), a learned position embedding
per stage (resampled bicubically for other input sizes) and a class token that joins in the
last stage; the head reads the class token.

Keys are the official code's (whai362/PVT ``classification/pvt.py``: ``patch_embedN``,
``pos_embedN``, ``blockN.M``, ``norm``, ``cls_token``, ``head``), so its checkpoints load
unchanged; :mod:`vitlab.pretrained.convert_pvt` converts Hugging Face ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from torch import Tensor, nn

from ..components import LearnedPosEmbed, PatchEmbed, drop_path_rates, tokens_to_map
from .base import GroupMatcher, IntermediateResult, MapTap, classifier_head, config_errors, init_linears, pretrained_cfg
from .pyramid import PyramidBackbone, PyramidConfig, sra_block
from .pvt_v2 import PvtV2Config, PyramidVisionTransformerV2  # noqa: F401  (re-exported: the PVT family)
from .pyramid import SpatialReductionAttention  # noqa: F401  (re-exported)
from .registry import register_family


@dataclass(frozen=True)
class PvtConfig(PyramidConfig):
    """Configuration of a :class:`PyramidVisionTransformer` (v1; see :class:`PyramidConfig`).

    Attributes:
        patch_size: Patch side of the first stage (later stages use 2x2 patches).
        pad_input: Pad inputs (and stage maps) that are not a multiple of the patch size
            (else raise).
    """

    depths: tuple[int, ...] = (2, 2, 2, 2)
    patch_size: int = 4
    pad_input: bool = True

    @property
    def first_stride(self) -> int:
        return self.patch_size

    def min_stage_grids(self) -> list[int]:
        out = super().min_stage_grids()
        # A stage followed by another feeds a 2x2 patch embedding: its grid must hold one patch.
        return [max(m, 2) if i < self.num_stages - 1 else m for i, m in enumerate(out)]

    def min_image_size(self) -> int:
        return max(super().min_image_size(), self.patch_size)

    def validate(self) -> list[str]:
        return super().validate() + config_errors(self, positive=("patch_size",), checks=[
            (not self.sr_ratios or self.sr_ratios[-1] == 1,
             f"the last stage carries the class token, so its sr_ratio must be 1 (got sr_ratios={self.sr_ratios})"),
        ])



class PyramidVisionTransformer(PyramidBackbone):
    """PVT v1 classifier/backbone (non-overlapping patches, learned position embeddings, SRA).

    Keys equal the official code's (``patch_embed1..4``, ``pos_embed1..4``, ``block1..4``,
    ``norm``, ``cls_token``, ``head``), so official checkpoints load as they are.

    Args:
        config: A :class:`PvtConfig`; keyword arguments override its fields.

    Example:
        >>> model = PyramidVisionTransformer(PvtConfig(dims=(8, 16, 40, 64), image_size=64, num_classes=10))
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    family = "pvt"
    config_class = PvtConfig
    num_prefix_tokens = 1
    no_weight_decay_names = ("cls_token",)  # and the position embeddings

    def __init__(self, config: PvtConfig | None = None, **overrides) -> None:
        super().__init__(config, overrides)
        c = self.config
        n = c.num_stages
        self.grid_sizes = c.stage_grids(c.image_size)
        rates = drop_path_rates(c.drop_path, c.depths)
        local_norm = partial(nn.LayerNorm, eps=c.local_norm_eps)
        for i in range(n):
            in_ch = c.in_channels if i == 0 else c.dims[i - 1]
            embed = PatchEmbed(c.patch_size if i == 0 else 2, in_ch, c.dims[i], norm_layer=local_norm, pad_input=c.pad_input)
            prefix = self.num_prefix_tokens if i == n - 1 else 0
            gh, gw = self.grid_sizes[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", LearnedPosEmbed((gh, gw), c.dims[i], num_prefix_tokens=prefix))
            setattr(self, f"block{i + 1}", nn.ModuleList(sra_block(c, i, r, prefix=prefix) for r in rates[i]))
        self.pos_drop = nn.Dropout(c.dropout)
        self.norm = nn.LayerNorm(c.dims[-1], eps=c.norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dims[-1]))
        self.num_features = c.dims[-1]
        self.head = classifier_head(self.num_features, c.num_classes)
        self.feature_info = [
            dict(num_chs=c.dims[i], reduction=c.patch_size * 2**i, module=f"block{i + 1}") for i in range(n)
        ]
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0])
        self.init_weights()

    def init_weights(self) -> None:
        """The official scheme: truncated normal (std 0.02) for linears, position embeddings
        and the class token; convolutions keep PyTorch's default."""
        init_linears(self)
        for i in range(self.config.num_stages):
            self.stage_pos_embed(i).init_weights(std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ------------------------------------------------------------- stage parts
    def check_input(self, x: Tensor, embed: PatchEmbed) -> Tensor:
        stride = self.config.patch_size * 2 ** (self.config.num_stages - 1)
        if not self.config.pad_input and x.ndim == 4 and (x.shape[-2] % stride or x.shape[-1] % stride):
            raise ValueError(
                f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the total stride {stride}; "
                f"resize it or build the model with pad_input=True"
            )
        return super().check_input(x, embed)

    def stage_patch_embed(self, i: int) -> PatchEmbed:
        return getattr(self, f"patch_embed{i + 1}")

    def stage_pos_embed(self, i: int) -> LearnedPosEmbed:
        return getattr(self, f"pos_embed{i + 1}")

    def stage_blocks(self, i: int) -> nn.ModuleList:
        return getattr(self, f"block{i + 1}")

    def stage_prefix(self, i: int) -> int:
        return self.num_prefix_tokens if i == self.config.num_stages - 1 else 0

    def block_module_name(self, stage: int, block: int) -> str:
        return f"block{stage + 1}.{block}"

    def position_embedding(self, i: int, grid: tuple[int, int]) -> Tensor:
        """Stage ``i``'s position embedding for a token grid, resampled (bicubic) if the grid is new."""
        return self.stage_pos_embed(i)(grid)

    def run_stages(self, x: Tensor, last: int | None = None,
                   tap: MapTap | None = None) -> Iterator[tuple[int, Tensor, tuple[int, int]]]:
        """Yield ``(stage index, tokens (B, P + H*W, C), grid)``; P = 1 (class token) in the last stage.

        ``tap`` (``collect_intermediates``) sees each stage's output and gives the tokens to go on with.
        """
        n = self.config.num_stages
        x = self.check_input(x, self.stage_patch_embed(0))
        last = n - 1 if last is None else last
        for i in range(last + 1):
            tokens, grid = self.stage_patch_embed(i)(x)  # (B, H*W, C)
            if i == n - 1:
                tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + H*W, C)
            tokens = self.pos_drop(tokens + self.position_embedding(i, grid))
            tokens = self.run_blocks(self.stage_blocks(i), tokens, grid)
            if tap is not None:
                tokens = tap(i, tokens, grid, self.stage_prefix(i))
            yield i, tokens, grid
            if i < n - 1:
                x = tokens_to_map(tokens, grid)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image -> normed last-stage tokens (B, 1 + H/32 * W/32, C), class token first."""
        self.reject_mask(mask)
        for _, x, _ in self.run_stages(x):
            pass
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> the class token -> logits (or the class token itself)."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Stage maps (B, C_i, H/s_i, W/s_i) at strides 4, 8, 16, 32 (class token left out), and the final tokens.

        ``norm`` applies the final LayerNorm to the last stage's map (v1 has no norm after the other stages).
        """
        n = self.config.num_stages
        tap = MapTap(take, (lambda i: self.norm if i == n - 1 else None) if norm else None)
        for _, tokens, _ in self.run_stages(x, last=take[-1] if stop_early else None, tap=tap):
            pass
        final = None if stop_early else self.norm(tokens)
        return final, tap.result()

    # ------------------------------------------------------------- contract
    def group_matcher(self) -> GroupMatcher:
        """Stem: the first stage's embeddings; a block per group, a later stage's embeddings (and,
        in the last stage, the class token) with the stage's first block."""
        return dict(stem=r"^(patch_embed|pos_embed)1(\.|$)",
                    blocks=[(r"^block(\d+)\.(\d+)", None), (r"^(?:patch_embed|pos_embed)(\d+)", None),
                            (r"^cls_token", (self.config.num_stages,))])

    @classmethod
    def tiny_overrides(cls, config: PvtConfig) -> dict:
        """Same heads, ratios and patch size; width 4 per head, at most 2 blocks per stage,
        a 16x12-patch input (stage grids 16x12, 8x6, 4x3, 2x2)."""
        p = config.patch_size
        return dict(dims=tuple(4 * h for h in config.heads), depths=tuple(min(d, 2) for d in config.depths),
                    image_size=(16 * p, 12 * p))


# PVT v1: the official pvt_tiny..pvt_large (whai362/PVT classification/pvt.py); weights as
# converted to Hugging Face by Zetatech (HF layout, converted on load), and the official release.
_V1 = dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), patch_size=4)
_V1_DEPTHS = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}

register_family(
    "pvt",
    PyramidVisionTransformer,
    PvtConfig,
    {
        f"pvt_{size}": (
            {**_V1, "depths": depths},
            pretrained_cfg(
                hub_id=f"Zetatech/pvt-{size}-224",
                url=f"https://github.com/whai362/PVT/releases/download/v2/pvt_{size}.pth",
            ),
        )
        for size, depths in _V1_DEPTHS.items()
    },
)

