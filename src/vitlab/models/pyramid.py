"""What PVT v1 and v2 share: the pyramid config, spatial-reduction attention, the stage plumbing.

What the papers add to vitlab's components:

* **A pyramid.** Four stages at strides 4, 8, 16 and 32, each opened by a patch embedding
  (:class:`~vitlab.components.PatchEmbed`): non-overlapping 4x4 then 2x2 patches in v1,
  overlapping 7x7 stride 4 then 3x3 stride 2 convolutions in v2, each followed by a LayerNorm.
* **Spatial-reduction attention** (:class:`SpatialReductionAttention`, a
  :class:`~vitlab.components.CrossAttention`): queries from every token, keys and values from
  the token grid shrunk by a strided convolution (kernel = stride = ``sr_ratio``) and a
  LayerNorm. v2's linear variant (``pvt_v2_b2_li``) instead average-pools the grid to 7x7 and
  applies a 1x1 convolution, LayerNorm and GELU, in every stage.

The families themselves live in :mod:`vitlab.models.pvt` (v1) and :mod:`vitlab.models.pvt_v2`.

LayerNorm epsilon: the official code and timm use 1e-6 in the blocks and after the stages
(``norm_eps``) but PyTorch's default 1e-5 in the patch embeddings and the spatial-reduction
norms (``local_norm_eps``). Hugging Face's port uses its ``layer_norm_eps`` (1e-6) for all of
them; build with ``local_norm_eps=1e-6`` to reproduce its numbers bit for bit.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from ..components import (
    AttentionLayout,
    Block,
    CrossAttention,
    FeatureLayout,
    Mlp,
    PatchEmbed,
    Segment,
    TokenGrid,
    TokenLayout,
    square_cell,
    to_2tuple,
)
from ..config import build_config
from .base import Backbone, config_errors, raise_config_errors

#: Side of the pooled key grid of v2's linear spatial-reduction attention.
LINEAR_POOL_SIZE = 7


# ---------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class PyramidConfig(abc.ABC):
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
        raise_config_errors(self, errors)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    @abc.abstractmethod
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
        return errors + config_errors(
            self, positive=("dims", "depths", "heads", "mlp_ratios", "sr_ratios", "in_channels", "norm_eps",
                            "local_norm_eps", "image_size"),
            rates=("dropout", "attention_dropout", "drop_path"),
            checks=[(all(h <= 0 or d % h == 0 for d, h in zip(self.dims, self.heads)),
                     f"dims {self.dims} must be divisible by heads {self.heads} stage by stage")],
        )


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


def sra_block(
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


class PyramidBackbone(Backbone):
    """Contract plumbing shared by PVT v1 and v2 (the stage loop differs)."""

    config: PyramidConfig
    config_class: type[PyramidConfig]

    def __init__(self, config: PyramidConfig | None, overrides: dict) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(self.config_class, vars(config) if config is not None else {}, **overrides)
        self.config = config

    def run_blocks(self, blocks: nn.ModuleList, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """A stage's blocks on tokens (B, P + h*w, C) laid on ``grid`` (checkpointed when enabled)."""
        for blk in blocks:
            x = self.run_checkpointed(blk, x, grid=grid)
        return x

    def check_input(self, x: Tensor, embed: PatchEmbed) -> Tensor:
        """Channels, ndim and padding (the embedding's checks), then every stage's minimum grid."""
        x = embed.check_input(x)
        self.config.check_image_size((x.shape[-2], x.shape[-1]))
        return x

    @abc.abstractmethod
    def stage_blocks(self, i: int) -> nn.ModuleList:
        """The blocks of stage ``i``."""
        raise NotImplementedError

    def stage_prefix(self, i: int) -> int:
        """Prefix tokens (v1's class token) before the grid tokens in stage ``i``."""
        return 0

    @abc.abstractmethod
    def block_module_name(self, stage: int, block: int) -> str:
        """Module name of block ``block`` of stage ``stage``."""
        raise NotImplementedError

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Spatial-reduction attention per block, keys on the reduced grid; maps after every stage."""
        c = self.config
        attention, features = [], []
        for s, shape in enumerate(c.stage_grids(tuple(image_size))):
            stride = self.feature_info[s]["reduction"]
            q = TokenGrid(shape, square_cell(stride))
            prefix = (Segment(("cls", 0)),) * self.stage_prefix(s)
            for j, blk in enumerate(self.stage_blocks(s)):
                attn = blk.attn
                if attn.reduction == "pool":  # the whole grid pooled to 7x7
                    kg = (LINEAR_POOL_SIZE, LINEAR_POOL_SIZE)
                    kcell = (shape[0] * stride / kg[0], shape[1] * stride / kg[1])
                elif attn.reduction == "conv":
                    kg = (shape[0] // attn.sr_ratio, shape[1] // attn.sr_ratio)
                    kcell = square_cell(stride * attn.sr_ratio)
                else:
                    kg, kcell = shape, q.cell
                sr = f" (keys on a {kg[0]}x{kg[1]} reduced grid)" if attn.reduction != "none" else ""
                attention.append(AttentionLayout(
                    f"{self.block_module_name(s, j)}.attn", f"stage {s + 1} block {j + 1}{sr}", "spatial-reduction",
                    (*prefix, Segment(("grid", 0), q)), (*prefix, Segment(("grid", 0), TokenGrid(kg, kcell)))))
            last = len(self.stage_blocks(s)) - 1
            features.append(FeatureLayout(f"stage {s + 1}", q, self.block_module_name(s, last), len(prefix),
                                          reaches_head=not prefix))
        readout = (("cls", 0),) if self.stage_prefix(c.num_stages - 1) else (("grid", 0),)
        # default queries: none (v1's class token joins only in the last stage: the mean query everywhere)
        return TokenLayout(tuple(attention), tuple(features), readout=readout)
