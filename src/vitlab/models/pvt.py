"""Pyramid Vision Transformer: PVT v1 (Wang et al., 2021) and PVT v2 (Wang et al., 2022).

What the papers add to vitlab's components:

* **A pyramid.** Four stages at strides 4, 8, 16 and 32, each opened by a patch embedding
  (:class:`~vitlab.components.PatchEmbed`): non-overlapping 4x4 then 2x2 patches in v1,
  overlapping 7x7 stride 4 then 3x3 stride 2 convolutions in v2, each followed by a LayerNorm.
* **Spatial-reduction attention** (:class:`SpatialReductionAttention`, a
  :class:`~vitlab.components.CrossAttention`): queries from every token, keys and values from
  the token grid shrunk by a strided convolution (kernel = stride = ``sr_ratio``) and a
  LayerNorm. v2's linear variant (``pvt_v2_b2_li``) instead average-pools the grid to 7x7 and
  applies a 1x1 convolution, LayerNorm and GELU, in every stage.
* v1: a learned position embedding per stage (resampled bicubically for other input sizes)
  and a class token that joins in the last stage; the head reads the class token.
* v2: a convolutional feed-forward network (a depth-wise 3x3 convolution on the hidden tokens,
  :class:`DepthwiseConv`, plugged into :class:`~vitlab.components.Mlp` as its ``mid`` hook;
  the linear variant puts a ReLU before it), a LayerNorm after every stage, no position
  embedding, global average pooling.

State-dict keys. v2 follows timm's ``pvt_v2`` layout (``patch_embed``, ``stages.N.downsample``,
``stages.N.blocks.M.attn.{q,kv,sr,norm,proj}``, ``stages.N.norm``, ``head``) except that the
depth-wise convolution is ``mlp.mid.dwconv`` (timm: ``mlp.dwconv``). v1 uses the official
code's names (whai362/PVT ``classification/pvt.py``: ``patch_embedN``, ``pos_embedN``,
``blockN.M``, ``norm``, ``cls_token``, ``head``), so its checkpoints load unchanged.
Converters for timm, the official v2 code and Hugging Face transformers live in
:mod:`vitlab.pretrained.convert_pvt`.

LayerNorm epsilon: the official code and timm use 1e-6 in the blocks and after the stages
(``norm_eps``) but PyTorch's default 1e-5 in the patch embeddings and the spatial-reduction
norms (``local_norm_eps``). Hugging Face's port uses its ``layer_norm_eps`` (1e-6) for all of
them; build with ``local_norm_eps=1e-6`` to reproduce its numbers bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..components import (
    Block,
    CrossAttention,
    Mlp,
    PatchEmbed,
    checkpoint_seq,
    interpolate_pos_embed,
    to_2tuple,
)
from ..config import build_config
from .base import Backbone, classifier_head, init_linears, pretrained_cfg, resolve_indices
from .registry import register_family

#: Side of the pooled key grid of v2's linear spatial-reduction attention.
LINEAR_POOL_SIZE = 7


# ---------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class PyramidConfig:
    """Fields shared by :class:`PvtConfig` (v1) and :class:`PvtV2Config` (v2).

    Attributes:
        image_size: Default input size (int or (H, W)). v1's position embeddings are laid
            out for it; v2 uses it only as the nominal input size.
        in_channels: Image channels.
        num_classes: Classifier outputs; 0 for no head (features only).
        dims: Token width per stage.
        depths: Number of blocks per stage.
        heads: Attention heads per stage (an int: the same in every stage).
        mlp_ratios: MLP hidden width / token width per stage (an int/float: the same everywhere).
        sr_ratios: Spatial-reduction ratio per stage (1: keys from every token).
        qkv_bias: Bias in the query and key/value projections.
        dropout: Dropout in the MLPs and after the attention projection (v1: also after
            adding the position embedding).
        attention_dropout: Dropout on the attention probabilities.
        drop_path: Stochastic-depth rate of the last block (linearly increasing from 0 over
            all blocks).
        norm_eps: LayerNorm epsilon in the blocks and the stage / final norms.
        local_norm_eps: LayerNorm epsilon after the patch embeddings and in the
            spatial-reduction attention (PyTorch's default in the official code and timm).
    """

    image_size: int | tuple[int, int] = 224
    in_channels: int = 3
    num_classes: int = 1000
    dims: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    heads: int | tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: float | tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    sr_ratios: int | tuple[int, ...] = (8, 4, 2, 1)
    qkv_bias: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    local_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", to_2tuple(self.image_size))
        n = len(self.depths) if isinstance(self.depths, (tuple, list)) else 0

        def per_stage(name: str, cast: type) -> None:
            v = getattr(self, name)
            v = tuple(cast(x) for x in v) if isinstance(v, (tuple, list)) else (cast(v),) * n
            object.__setattr__(self, name, v)

        for name, cast in (("dims", int), ("depths", int), ("heads", int), ("mlp_ratios", float), ("sr_ratios", int)):
            per_stage(name, cast)
        errors = self.validate()
        if not errors:
            try:
                self.check_image_size(self.image_size, what="image_size")
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(errors))

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def first_stride(self) -> int:
        """Stride of the first patch embedding (the model's output stride of stage 0)."""
        raise NotImplementedError

    def min_stage_grids(self) -> list[int]:
        """Smallest token-grid side each stage can run on."""
        return [1 if s <= 1 else s for s in self.sr_ratios]

    def stage_grids(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid of every stage for an input size: ceil(size / stride) per stage."""
        out = []
        for i in range(self.num_stages):
            stride = self.first_stride * 2**i
            out.append((-(-size[0] // stride), -(-size[1] // stride)))
        return out

    def min_image_size(self) -> int:
        """Smallest image side every stage can run on."""
        need = 1
        for i, m in enumerate(self.min_stage_grids()):
            need = max(need, (m - 1) * self.first_stride * 2**i + 1)
        return need

    def check_image_size(self, size: tuple[int, int], what: str = "image size") -> None:
        """Raise ValueError when a stage's token grid is smaller than it needs (its sr_ratio)."""
        for i, (grid, m) in enumerate(zip(self.stage_grids(size), self.min_stage_grids())):
            if grid[0] < m or grid[1] < m:
                least = self.min_image_size()
                raise ValueError(
                    f"{what} {size[0]}x{size[1]} is too small: stage {i} would have a {grid[0]}x{grid[1]} token "
                    f"grid, but its spatial reduction (sr_ratio={self.sr_ratios[i]}) needs at least {m}x{m}; "
                    f"use images of at least {least}x{least} pixels"
                )

    def validate(self) -> list[str]:
        """Every problem with the field values, as messages (empty when valid)."""
        errors = []
        n = self.num_stages
        if n == 0:
            errors.append("depths must list at least one stage")
        for name in ("dims", "heads", "mlp_ratios", "sr_ratios"):
            if len(getattr(self, name)) != n:
                errors.append(f"{name} has {len(getattr(self, name))} entries but depths has {n} stages")
        for name in ("dims", "depths", "heads", "mlp_ratios", "sr_ratios"):
            if any(v <= 0 for v in getattr(self, name)):
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.in_channels <= 0:
            errors.append(f"in_channels must be positive, got {self.in_channels}")
        if self.num_classes < 0:
            errors.append(f"num_classes must be >= 0, got {self.num_classes}")
        for d, h in zip(self.dims, self.heads):
            if h > 0 and d % h:
                errors.append(f"dims {self.dims} must be divisible by heads {self.heads} stage by stage")
                break
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("norm_eps", "local_norm_eps"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if any(s <= 0 for s in self.image_size):
            errors.append(f"image_size must be positive, got {self.image_size}")
        return errors


@dataclass(frozen=True)
class PvtV2Config(PyramidConfig):
    """Configuration of a :class:`PyramidVisionTransformerV2` (see :class:`PyramidConfig`).

    Attributes:
        linear: Linear spatial-reduction attention (``_li`` variants): keys/values from the
            grid average-pooled to 7x7 (1x1 conv, LayerNorm, GELU) in every stage, and a ReLU
            before the MLP's depth-wise convolution; ``sr_ratios`` are then unused.
        head_dropout: Dropout before the classifier.
    """

    linear: bool = False
    head_dropout: float = 0.0

    @property
    def first_stride(self) -> int:
        return 4

    def min_stage_grids(self) -> list[int]:
        return [1] * self.num_stages if self.linear else super().min_stage_grids()

    def min_image_size(self) -> int:
        return max(super().min_image_size(), 7)  # the 7x7 stem convolution

    def validate(self) -> list[str]:
        errors = super().validate()
        if not 0.0 <= self.head_dropout < 1.0:
            errors.append(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        return errors


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
        errors = super().validate()
        if self.patch_size <= 0:
            errors.append(f"patch_size must be positive, got {self.patch_size}")
        if self.sr_ratios and self.sr_ratios[-1] != 1:
            errors.append(
                f"the last stage carries the class token, so its sr_ratio must be 1 (got sr_ratios={self.sr_ratios})"
            )
        return errors


# ---------------------------------------------------------------------------------- layers
class SpatialReductionAttention(CrossAttention):
    """PVT's spatial-reduction attention (SRA): keys and values from a reduced token grid.

    Queries come from every token; keys/values from the grid shrunk by a convolution with
    kernel = stride = ``sr_ratio`` followed by a LayerNorm (``sr_ratio`` 1: the tokens
    themselves), or, with ``linear=True`` (PVT v2's linear SRA), from the grid average-pooled
    to 7x7, a 1x1 convolution, a LayerNorm and a GELU. Keys: ``q``, ``kv`` (fused), ``sr``,
    ``norm``, ``proj``, as in timm and the official code.

    ``capture_info`` holds the query grid, the (reduced) key grid, the number of prefix
    tokens (v1's class token, present in queries and keys alike) and the reduction.

    Args:
        dim: Token width.
        heads: Attention heads.
        sr_ratio: Spatial-reduction ratio (kernel and stride of the reduction convolution).
        linear: Linear SRA (pool to 7x7) instead of the strided convolution.
        qkv_bias: Bias in the q and kv projections.
        attn_drop: Dropout on the attention probabilities.
        proj_drop: Dropout after the output projection.
        norm_eps: Epsilon of the reduction's LayerNorm.
        num_prefix_tokens: Tokens before the grid tokens (only without reduction).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        sr_ratio: int = 1,
        linear: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-5,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__(dim, heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.num_prefix_tokens = num_prefix_tokens
        if linear:
            self.pool: nn.Module | None = nn.AdaptiveAvgPool2d(LINEAR_POOL_SIZE)
            self.sr: nn.Conv2d | None = nn.Conv2d(dim, dim, kernel_size=1)
        else:
            self.pool = None
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if self.sr is not None else None
        self.act = nn.GELU() if linear else nn.Identity()
        if self.sr is not None and num_prefix_tokens:
            raise ValueError(
                "spatial reduction needs a pure token grid: use sr_ratio=1 (and linear=False) where there are "
                f"prefix tokens (got num_prefix_tokens={num_prefix_tokens}, sr_ratio={sr_ratio}, linear={linear})"
            )

    @property
    def reduction(self) -> str:
        """``"pool"`` (linear SRA), ``"conv"`` (strided convolution) or ``"none"``."""
        return "pool" if self.linear else ("conv" if self.sr is not None else "none")

    def reduce(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Grid tokens (B, H*W, C) -> reduced keys/values source (B, h*w, C) and its grid (h, w)."""
        b, n, c = x.shape
        fmap = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])  # (B, H*W, C) -> (B, C, H, W)
        if self.pool is not None:
            fmap = self.pool(fmap)  # (B, C, 7, 7)
        fmap = self.sr(fmap)  # (B, C, H/sr, W/sr), or (B, C, 7, 7) for linear SRA
        key_grid = (fmap.shape[2], fmap.shape[3])
        context = fmap.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        return self.act(self.norm(context)), key_grid

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Tokens (B, P + H*W, C) on ``grid`` (H, W) -> (B, P + H*W, C)."""
        if grid is None:
            raise ValueError("SpatialReductionAttention needs the token grid (H, W)")
        p = self.num_prefix_tokens
        if x.shape[1] != p + grid[0] * grid[1]:
            raise ValueError(f"got {x.shape[1]} tokens for a {grid[0]}x{grid[1]} grid with {p} prefix token(s)")
        context, key_grid = (None, tuple(grid)) if self.sr is None else self.reduce(x, grid)
        self.capture_info = dict(
            grid=tuple(grid), key_grid=tuple(key_grid), num_prefix_tokens=p, num_key_prefix_tokens=p,
            sr_ratio=self.sr_ratio, reduction=self.reduction,
        )
        return super().forward(x, context, attn_bias)


class DepthwiseConv(nn.Module):
    """PVT v2's convolutional feed-forward piece: a 3x3 depth-wise convolution on the token grid.

    Plugged into :class:`~vitlab.components.Mlp` as ``mid`` (after fc1, before the
    activation). With ``relu=True`` (linear variants) a ReLU comes first.
    """

    def __init__(self, dim: int, relu: bool = False) -> None:
        super().__init__()
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        if grid is None:
            raise ValueError("the depth-wise convolution of PVT v2's MLP needs the token grid (H, W)")
        b, n, c = x.shape
        x = self.relu(x).transpose(1, 2).reshape(b, c, grid[0], grid[1])  # (B, H*W, C) -> (B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def _drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Linearly increasing stochastic-depth rates over all blocks, split per stage."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start : start + d])
        start += d
    return out


def _sra_block(
    c: PyramidConfig, stage: int, drop_path: float, linear: bool = False, conv_mlp: bool = False, prefix: int = 0
) -> Block:
    """A pre-norm block of stage ``stage`` with spatial-reduction attention (and v2's conv MLP)."""
    dim = c.dims[stage]
    hidden = int(dim * c.mlp_ratios[stage])
    attn = SpatialReductionAttention(
        dim, c.heads[stage], sr_ratio=c.sr_ratios[stage], linear=linear, qkv_bias=c.qkv_bias,
        attn_drop=c.attention_dropout, proj_drop=c.dropout, norm_eps=c.local_norm_eps, num_prefix_tokens=prefix,
    )
    mlp = Mlp(dim, hidden, drop=c.dropout, mid=DepthwiseConv(hidden, relu=linear) if conv_mlp else None)
    return Block(
        dim, c.heads[stage], hidden, drop_path=drop_path, norm_layer=partial(nn.LayerNorm, eps=c.norm_eps),
        attn=attn, mlp=mlp,
    )


def _block_layer_id(depths: Sequence[int], stage: int, block: int = 0) -> int:
    """Layer id of block ``block`` of ``stage``: its index over all blocks + 1 (0 is the stem)."""
    return sum(depths[:stage]) + block + 1


def _tokens_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])  # (B, H*W, C) -> (B, C, H, W)


class _PyramidBackbone(Backbone):
    """Contract plumbing shared by PVT v1 and v2 (the stage loop differs)."""

    config: PyramidConfig
    config_class: type[PyramidConfig]

    def __init__(self, config: PyramidConfig | None, overrides: dict) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(self.config_class, vars(config) if config is not None else {}, **overrides)
        self.config = config

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor, grid: tuple[int, int]) -> Tensor:
        ckpt = self._checkpointing()
        for blk in blocks:
            x = checkpoint_seq(blk, x, grid=grid) if ckpt else blk(x, grid=grid)
        return x

    def _check_input(self, x: Tensor, embed: PatchEmbed) -> Tensor:
        x = embed.check_input(x)  # channels, ndim, padding
        self.config.check_image_size((x.shape[-2], x.shape[-1]))
        return x

    @property
    def num_layer_ids(self) -> int:
        """Embedding (0), every block in order, then the final norm / head."""
        return sum(self.config.depths) + 2

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` outputs (0: no head)."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.head = classifier_head(self.num_features, num_classes)


# ---------------------------------------------------------------------------------- PVT v2
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
        self.blocks = nn.ModuleList(_sra_block(c, index, r, linear=c.linear, conv_mlp=True) for r in drop_paths)
        self.norm = nn.LayerNorm(c.dims[index], eps=c.norm_eps)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Previous stage's map (B, C_in, H, W) -> tokens (B, H/2 * W/2, C), grid."""
        return self.downsample(x)


class PyramidVisionTransformerV2(_PyramidBackbone):
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

    def __init__(self, config: PvtV2Config | None = None, **overrides) -> None:
        super().__init__(config, overrides)
        c = self.config
        self.patch_embed = PatchEmbed(
            7, c.in_channels, c.dims[0], stride=4, norm_layer=partial(nn.LayerNorm, eps=c.local_norm_eps)
        )
        rates = _drop_path_rates(c.drop_path, c.depths)
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

    def run_stages(self, x: Tensor, last: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(stage index, output map (B, C, H, W))`` for stages 0..last."""
        x = self._check_input(x, self.patch_embed)
        tokens, grid = self.patch_embed(x)  # (B, H/4 * W/4, C)
        last = len(self.stages) - 1 if last is None else last
        for i in range(last + 1):
            stage = self.stages[i]
            if i > 0:
                tokens, grid = stage.embed(x)
            tokens = stage.norm(self._run_blocks(stage.blocks, tokens, grid))
            x = _tokens_to_map(tokens, grid)
            yield i, x

    def forward_features(self, x: Tensor) -> Tensor:
        """Image -> the last stage's normed map (B, C, H/32, W/32)."""
        for _, x in self.run_stages(x):
            pass
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Map (B, C, H, W) -> global average pool -> dropout -> logits (or the pooled features)."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False) -> list[Tensor]:
        """Stage output maps (B, C_i, H/s_i, W/s_i) at strides 4, 8, 16, 32.

        Args:
            x: Images (B, C, H, W).
            indices: None for every stage, k for the last k, or a list of stage indices.
            norm: Accepted for the contract; every stage output is already normed by its
                stage LayerNorm (that is the map the next stage embeds), so it changes nothing.
        """
        take = resolve_indices(indices, len(self.stages))
        return [fmap for i, fmap in self.run_stages(x, last=take[-1]) if i in take]

    def layer_id(self, name: str) -> int:
        """0: stem; a block: its global index + 1 (a stage's patch embedding goes with the
        stage's first block, its norm with its last); head: total depth + 1."""
        depths = self.config.depths
        if name.startswith("patch_embed"):
            return 0
        m = re.match(r"^stages\.(\d+)\.(blocks\.(\d+)|downsample|norm)", name)
        if m:
            s = int(m.group(1))
            if m.group(3) is not None:
                return _block_layer_id(depths, s, int(m.group(3)))
            if m.group(2) == "norm":
                return _block_layer_id(depths, s, depths[s] - 1)
            return _block_layer_id(depths, s)
        return sum(depths) + 1

    @classmethod
    def tiny_overrides(cls, config: PvtV2Config) -> dict:
        """Same heads, ratios and attention kind; width 4 per head, at most 2 blocks per stage,
        a 64x48 input (stage grids 16x12, 8x6, 4x3, 2x2)."""
        return dict(dims=tuple(4 * h for h in config.heads), depths=tuple(min(d, 2) for d in config.depths),
                    image_size=(64, 48))


# ---------------------------------------------------------------------------------- PVT v1
class PyramidVisionTransformer(_PyramidBackbone):
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

    def __init__(self, config: PvtConfig | None = None, **overrides) -> None:
        super().__init__(config, overrides)
        c = self.config
        n = c.num_stages
        self.grid_sizes = c.stage_grids(c.image_size)
        rates = _drop_path_rates(c.drop_path, c.depths)
        local_norm = partial(nn.LayerNorm, eps=c.local_norm_eps)
        for i in range(n):
            in_ch = c.in_channels if i == 0 else c.dims[i - 1]
            embed = PatchEmbed(c.patch_size if i == 0 else 2, in_ch, c.dims[i], norm_layer=local_norm, pad_input=c.pad_input)
            prefix = self.num_prefix_tokens if i == n - 1 else 0
            gh, gw = self.grid_sizes[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, prefix + gh * gw, c.dims[i])))
            setattr(self, f"block{i + 1}", nn.ModuleList(_sra_block(c, i, r, prefix=prefix) for r in rates[i]))
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
            nn.init.trunc_normal_(self.stage_pos_embed(i), std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ------------------------------------------------------------- stage parts
    def _check_input(self, x: Tensor, embed: PatchEmbed) -> Tensor:
        stride = self.config.patch_size * 2 ** (self.config.num_stages - 1)
        if not self.config.pad_input and x.ndim == 4 and (x.shape[-2] % stride or x.shape[-1] % stride):
            raise ValueError(
                f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the total stride {stride}; "
                f"resize it or build the model with pad_input=True"
            )
        return super()._check_input(x, embed)

    def stage_patch_embed(self, i: int) -> PatchEmbed:
        return getattr(self, f"patch_embed{i + 1}")

    def stage_pos_embed(self, i: int) -> nn.Parameter:
        return getattr(self, f"pos_embed{i + 1}")

    def stage_blocks(self, i: int) -> nn.ModuleList:
        return getattr(self, f"block{i + 1}")

    def position_embedding(self, i: int, grid: tuple[int, int]) -> Tensor:
        """Stage ``i``'s position embedding for a token grid, resampled (bicubic) if the grid is new."""
        pe = self.stage_pos_embed(i)
        if tuple(grid) == tuple(self.grid_sizes[i]):
            return pe
        prefix = self.num_prefix_tokens if i == self.config.num_stages - 1 else 0
        return interpolate_pos_embed(pe, grid, prefix, old_grid=self.grid_sizes[i])

    def run_stages(self, x: Tensor, last: int | None = None) -> Iterator[tuple[int, Tensor, tuple[int, int]]]:
        """Yield ``(stage index, tokens (B, P + H*W, C), grid)``; P = 1 (class token) in the last stage."""
        n = self.config.num_stages
        x = self._check_input(x, self.stage_patch_embed(0))
        last = n - 1 if last is None else last
        for i in range(last + 1):
            tokens, grid = self.stage_patch_embed(i)(x)  # (B, H*W, C)
            if i == n - 1:
                tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + H*W, C)
            tokens = self.pos_drop(tokens + self.position_embedding(i, grid))
            tokens = self._run_blocks(self.stage_blocks(i), tokens, grid)
            yield i, tokens, grid
            if i < n - 1:
                x = _tokens_to_map(tokens, grid)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image -> normed last-stage tokens (B, 1 + H/32 * W/32, C), class token first."""
        for _, x, _ in self.run_stages(x):
            pass
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> the class token -> logits (or the class token itself)."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False) -> list[Tensor]:
        """Stage maps (B, C_i, H/s_i, W/s_i) at strides 4, 8, 16, 32 (class token left out).

        Args:
            x: Images (B, C, H, W).
            indices: None for every stage, k for the last k, or a list of stage indices.
            norm: Apply the final LayerNorm to the last stage's map (v1 has no norm after the
                other stages).
        """
        n = self.config.num_stages
        take = resolve_indices(indices, n)
        out = []
        for i, tokens, grid in self.run_stages(x, last=take[-1]):
            if i in take:
                if i == n - 1:
                    tokens = (self.norm(tokens) if norm else tokens)[:, self.num_prefix_tokens :]
                out.append(_tokens_to_map(tokens, grid))
        return out

    # ------------------------------------------------------------- contract
    def no_weight_decay(self) -> set[str]:
        """The position embeddings and the class token."""
        return {n for n, _ in self.named_parameters() if n.startswith("pos_embed") or n == "cls_token"}

    def layer_id(self, name: str) -> int:
        """0: first stage's embeddings; a block: its global index + 1 (a later stage's
        embeddings, and the class token, go with the stage's first block); final norm and
        head: total depth + 1."""
        depths = self.config.depths
        m = re.match(r"^(patch_embed|pos_embed|block)(\d+)(?:\.(\d+))?", name)
        if m:
            s = int(m.group(2)) - 1
            if m.group(1) == "block":
                return _block_layer_id(depths, s, int(m.group(3)))
            return 0 if s == 0 else _block_layer_id(depths, s)
        if name == "cls_token":
            return _block_layer_id(depths, len(depths) - 1)
        return sum(depths) + 1

    @classmethod
    def tiny_overrides(cls, config: PvtConfig) -> dict:
        """Same heads, ratios and patch size; width 4 per head, at most 2 blocks per stage,
        a 16x12-patch input (stage grids 16x12, 8x6, 4x3, 2x2)."""
        p = config.patch_size
        return dict(dims=tuple(4 * h for h in config.heads), depths=tuple(min(d, 2) for d in config.depths),
                    image_size=(16 * p, 12 * p))

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's per-stage position embeddings (bicubic) to this model's grids."""
        n = self.config.num_stages
        out = None
        for i in range(n):
            key = f"pos_embed{i + 1}"
            pe, own = state_dict.get(key), self.stage_pos_embed(i)
            if pe is None or pe.shape == own.shape or pe.ndim != 3 or pe.shape[-1] != own.shape[-1]:
                continue
            prefix = self.num_prefix_tokens if i == n - 1 else 0
            try:
                new = interpolate_pos_embed(pe, self.grid_sizes[i], prefix)
            except ValueError:
                continue  # not a square grid: left to the shape-mismatch report
            out = dict(state_dict) if out is None else out
            out[key] = new
        return state_dict if out is None else out


# ---------------------------------------------------------------------------------- variants
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
