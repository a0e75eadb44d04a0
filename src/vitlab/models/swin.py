"""Swin Transformer (Liu et al., 2021, "Hierarchical Vision Transformer using Shifted Windows").

What the paper adds to ViT:

* **Window attention with relative position bias**: self-attention is computed inside
  non-overlapping windows of ``window_size`` x ``window_size`` tokens, with a learned bias per
  relative offset (vitlab's :class:`~vitlab.components.WindowAttention` and
  :class:`~vitlab.components.RelativePositionBias`).
* **Shifted windows**: every odd block of a stage shifts the grid cyclically by half a window
  before partitioning, so information crosses window borders; a -100 mask keeps tokens that
  only met through the wrap-around apart (also in ``WindowAttention``).
* **Patch merging** (:class:`PatchMerging`, defined here): between stages each 2x2 group of
  neighbouring tokens is concatenated (4C), normalised and linearly reduced to 2C, halving
  the grid. Four stages give feature maps at strides 4, 8, 16 and 32.

There is no class token and no absolute position embedding: the head is a final LayerNorm,
global average pooling and a linear classifier.

Like timm, the window of a stage is clipped to the stage's grid at the configured image
size (the bias table then covers the clipped window) and a stage whose grid fits in one
window is never shifted. Any input size works: the patch embedding, every window
attention and every patch merging pad on the right/bottom as needed.

State-dict keys follow timm's layout (``patch_embed``, ``layers.{i}.downsample`` at the
*start* of stages 1..3, ``layers.{i}.blocks.{j}``, ``norm``, ``head``) except for vitlab's
shared modules: the bias table is ``attn.relative_position.table`` and the classifier
``head`` (timm: ``attn.relative_position_bias_table``, ``head.fc``). The converters in
:mod:`vitlab.pretrained.convert_swin` load timm, original Microsoft and Hugging Face
checkpoints.

Attention capture: one record per block, ``probs`` of shape (B * nW, heads, N, N) with
N = window area; ``info`` holds ``grid``, ``padded_grid``, ``window``, ``shift`` and
``batch`` (windows are ordered raster-wise over the padded, shifted grid, batch slowest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import (
    AttentionLayout, Block, FeatureLayout, PatchEmbed, RelativePositionBias, Segment, TokenGrid, TokenLayout,
    WindowAttention, drop_path_rates, resample_relative_position_table, square_cell, to_2tuple, tokens_to_map,
)
from ..config import build_config
from .base import (
    Backbone, GroupMatcher, IntermediateResult, MapTap, classifier_head, config_errors, init_linears, pretrained_cfg,
    raise_config_errors,
)
from .masking import fill_masked_tokens
from .registry import register_family


@dataclass(frozen=True)
class SwinConfig:
    """Configuration of a :class:`SwinTransformer` (each field is documented below it)."""

    patch_size: int = 4
    """Side of the patches of the first stage, in pixels (4 in the paper)."""
    in_channels: int = 3
    """Image channels."""
    num_classes: int = 1000
    """Classifier outputs; 0 for no head (features only)."""
    image_size: int | tuple[int, int] = 224
    """Default input size (int or (H, W)); sets each stage's window clipping."""
    dim: int = 96
    """Token width of the first stage (timm's ``embed_dim``); stage i has ``dim * 2**i``."""
    depths: tuple[int, ...] = (2, 2, 6, 2)
    """Number of blocks per stage (plain and shifted windows alternate)."""
    heads: tuple[int, ...] = (3, 6, 12, 24)
    """Attention heads per stage."""
    mlp_ratio: float = 4.0
    """MLP hidden width over token width."""
    qkv_bias: bool = True
    """Bias in the qkv projections."""
    dropout: float = 0.0
    """Dropout in the MLPs and after the attention projections."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    window_size: int | tuple[int, int] = 7
    """Side of the attention windows (int or (h, w))."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block, linearly increasing from 0 over all blocks
    (timm trains with 0.1-0.5; parameter counts do not depend on it)."""
    head_dropout: float = 0.0
    """Dropout before the classifier."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (1e-5, PyTorch's default, in timm and HF Swin)."""
    pad_input: bool = True
    """Pad inputs that are not a multiple of the patch size (else raise ValueError)."""
    mask_token: bool = False
    """Own a learned mask token, so ``forward_features(x, mask)`` takes a patch mask (SimMIM
    pre-training); off for classifiers, whose checkpoints then carry no unused parameter."""

    def __post_init__(self) -> None:
        errors = []
        try:
            object.__setattr__(self, "image_size", to_2tuple(self.image_size))
            object.__setattr__(self, "window_size", to_2tuple(self.window_size))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid SwinConfig: image_size and window_size must be an int or a pair ({e})") from None
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        if not self.depths:
            errors.append("depths must name at least one stage")
        if len(self.depths) != len(self.heads):
            errors.append(f"depths {self.depths} and heads {self.heads} must have one entry per stage")
        if any(d <= 0 for d in self.depths):
            errors.append(f"every stage depth must be positive, got {self.depths}")
        if any(h <= 0 for h in self.heads):
            errors.append(f"every stage's heads must be positive, got {self.heads}")
        elif self.dim > 0:
            for i, h in enumerate(self.heads):
                if (self.dim * 2**i) % h:
                    errors.append(f"stage {i} width {self.dim * 2**i} (dim * 2**{i}) is not divisible by its heads ({h})")
        if self.patch_size > 0 and any(s < self.patch_size for s in self.image_size):
            errors.append(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        raise_config_errors(self, config_errors(
            self, positive=("patch_size", "in_channels", "dim", "window_size", "mlp_ratio", "norm_eps"),
            rates=("dropout", "attention_dropout", "drop_path", "head_dropout"),
        ) + errors)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dims(self) -> list[int]:
        """Token width of every stage: ``dim * 2**i``."""
        return [self.dim * 2**i for i in range(self.num_stages)]

    def stage_grids(self) -> list[tuple[int, int]]:
        """Token grid of every stage at ``image_size`` (the image and odd grids are padded)."""
        grid = tuple(-(-s // self.patch_size) for s in self.image_size)
        grids = [grid]
        for _ in range(1, self.num_stages):
            grid = tuple((g + 1) // 2 for g in grid)
            grids.append(grid)
        return grids  # type: ignore[return-value]

    def stage_windows(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(window, shift of the odd blocks) per stage, clipped to the stage grid as in timm."""
        out = []
        for grid in self.stage_grids():
            window = tuple(min(g, w) for g, w in zip(grid, self.window_size))
            shift = tuple(w // 2 if g > w else 0 for g, w in zip(grid, window))
            out.append((window, shift))
        return out  # type: ignore[return-value]


class PatchMerging(nn.Module):
    """Swin's downsampling: concatenate each 2x2 group of tokens, normalise, reduce 4C -> out.

    The four neighbours are concatenated in the order of the original implementation (and of
    timm and Hugging Face): (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
    A grid with an odd side is zero-padded on the bottom/right first.

    Args:
        dim: Input token width C.
        out_dim: Output width; ``2 * dim`` by default.
        norm_layer: Norm over the 4C concatenation.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Tokens (B, H*W, C) on ``grid`` -> (B, ceil(H/2) * ceil(W/2), out_dim) and the new grid."""
        b, n, c = x.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"PatchMerging got {n} tokens for a {h}x{w} grid")
        x = x.view(b, h, w, c)  # (B, H*W, C) -> (B, H, W, C)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        # (B, 2*h2, 2*w2, C) -> (B, h2, row, w2, col, C) -> (B, h2, w2, col, row, C) -> (B, h2*w2, 4C)
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c)
        return self.reduction(self.norm(x)), (h2, w2)


class SwinStage(nn.Module):
    """One stage: optional patch merging (stages 1..), then blocks with plain / shifted windows.

    Args:
        in_dim: Width of the incoming tokens.
        dim: Width of this stage's tokens (``2 * in_dim`` after patch merging).
        depth: Number of blocks.
        heads: Attention heads.
        window: Attention window of the stage.
        shift: Cyclic shift of the odd blocks (0 where the grid fits in one window).
        mlp_ratio, qkv_bias, dropout, attention_dropout: As in :class:`SwinConfig`.
        drop_path: Stochastic-depth rate of every block.
        norm_layer: LayerNorm factory.
        downsample: Start with a :class:`PatchMerging`.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        heads: int,
        window: tuple[int, int],
        shift: tuple[int, int],
        mlp_ratio: float,
        qkv_bias: bool,
        dropout: float,
        attention_dropout: float,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, norm_layer) if downsample else None
        self.blocks = nn.ModuleList(
            Block(
                dim, heads, int(dim * mlp_ratio), dropout=dropout, drop_path=drop_path[j], norm_layer=norm_layer,
                attn=WindowAttention(
                    dim, heads, window, shift if j % 2 else 0, qkv_bias=qkv_bias,
                    attn_drop=attention_dropout, proj_drop=dropout,
                ),
            )
            for j in range(depth)
        )


class SwinTransformer(Backbone):
    """Swin Transformer (v1) classifier/backbone following vitlab's backbone contract.

    Args:
        config: A :class:`SwinConfig`; keyword arguments override its fields.

    Example:
        >>> model = SwinTransformer(SwinConfig(image_size=64, dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window_size=4))
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
        >>> [m.shape[1:] for m in model.forward_intermediates(torch.randn(1, 3, 64, 64))]
        [torch.Size([8, 16, 16]), torch.Size([16, 8, 8]), torch.Size([32, 4, 4]), torch.Size([64, 2, 2])]
    """

    family = "swin"
    config_class = SwinConfig
    no_weight_decay_names = ("table", "mask_token")

    def __init__(self, config: SwinConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(self.config_class, vars(config) if config is not None else {}, **overrides)
        self.config = c = config
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, c.dim, norm_layer=norm, pad_input=c.pad_input)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.mask_token else None
        dims = c.stage_dims()
        rates = drop_path_rates(c.drop_path, c.depths)
        self.layers = nn.ModuleList(
            SwinStage(
                dims[max(i - 1, 0)], dims[i], depth, c.heads[i], window, shift, c.mlp_ratio, c.qkv_bias,
                c.dropout, c.attention_dropout, rates[i], norm, downsample=i > 0,
            )
            for i, ((window, shift), depth) in enumerate(zip(c.stage_windows(), c.depths))
        )
        self.num_features = dims[-1]
        self.norm = norm(self.num_features)
        self.head_drop = nn.Dropout(c.head_dropout)
        self.head = classifier_head(self.num_features, c.num_classes)
        self.feature_info = [
            dict(num_chs=d, reduction=c.patch_size * 2**i, module=f"layers.{i}") for i, d in enumerate(dims)
        ]
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0])
        self.init_weights()

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """timm's scheme: linear weights truncated normal (std 0.02), linear biases zero.

        The bias tables initialise themselves (truncated normal, std 0.02), the LayerNorms to 1/0;
        the mask token (SimMIM) is truncated normal (std 0.02).
        """
        init_linears(self)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------- features
    def run_stages(self, x: Tensor, last: int | None = None,
                   tap: MapTap | None = None, mask: Tensor | None = None) -> Iterator[tuple[int, Tensor, tuple[int, int]]]:
        """Image (B, C, H, W) -> yields ``(stage index, tokens (B, h*w, C_i), grid (h, w))`` per stage.

        ``tap`` (``collect_intermediates``) sees each stage's output and gives the tokens to go on with.
        With a ``mask`` (B, N) over the first patch grid, the hidden patch embeddings are
        replaced by the mask token before the first stage (SimMIM).
        """
        x, grid = self.patch_embed(x)  # (B, N, C)
        if mask is not None:
            x = fill_masked_tokens(x, mask, self._mask_token())
        last = len(self.layers) - 1 if last is None else last
        for i, stage in enumerate(self.layers[: last + 1]):
            if stage.downsample is not None:
                x, grid = stage.downsample(x, grid)
            for block in stage.blocks:
                x = self.run_checkpointed(block, x, grid=grid)
            if tap is not None:
                x = tap(i, x, grid)
            yield i, x, grid

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image -> normed feature map of the last stage (B, num_features, H/32, W/32).

        ``mask`` (B, N) over the first patch grid (True: hidden) puts the learned mask token
        at the hidden patches (SimMIM); the model must be built with ``mask_token=True``.
        """
        for _, tokens, grid in self.run_stages(x, mask=mask):
            pass
        return tokens_to_map(self.norm(tokens), grid)

    def _mask_token(self) -> Tensor:
        if self.mask_token is None:
            raise ValueError(f"{type(self).__name__} was built without a mask token: create it with "
                             "mask_token=True to call forward_features(x, mask=...)")
        return self.mask_token

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map (B, C, h, w) (or tokens (B, N, C)) -> global average -> logits."""
        x = x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Per-stage maps (B, C_i, H/s_i, W/s_i) at strides 4, 8, 16, 32, and the final map.

        ``norm`` applies the final norm to the last stage's map (the only one it is sized for).
        """
        n = len(self.layers)
        tap = MapTap(take, (lambda i: self.norm if i == n - 1 else None) if norm else None)
        for _, tokens, grid in self.run_stages(x, last=take[-1] if stop_early else None, tap=tap):
            pass
        final = None if stop_early else tokens_to_map(self.norm(tokens), grid)
        return final, tap.result()

    # ------------------------------------------------------------- contract
    def group_matcher(self) -> GroupMatcher:
        """Stem: the patch embedding; one group per block across stages, a stage's patch merging
        with its first block."""
        return dict(stem=r"^(patch_embed|mask_token)", blocks=[(r"^layers\.(\d+)\.(?:blocks\.(\d+)|downsample)", None)])

    def stage_grids(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid of every stage for an input size (odd grids are padded before merging)."""
        grid = self.patch_embed.grid_size(tuple(image_size))
        grids = [tuple(grid)]
        for _ in range(1, len(self.layers)):
            grids.append(tuple((g + 1) // 2 for g in grids[-1]))
        return grids  # type: ignore[return-value]

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Window attention on each stage's grid (window and shift per block); maps after every stage."""
        attention, features = [], []
        for s, (stage, shape) in enumerate(zip(self.layers, self.stage_grids(image_size))):
            grid = TokenGrid(shape, square_cell(self.feature_info[s]["reduction"]))
            seg = (Segment(("grid", 0), grid),)
            for j, blk in enumerate(stage.blocks):
                window, shift = blk.attn.layout(shape)
                label = f"stage {s + 1} block {j + 1}" + (" (shifted windows)" if any(shift) else "")
                attention.append(AttentionLayout(f"layers.{s}.blocks.{j}.attn", label, "window", seg, seg, window, shift))
            features.append(FeatureLayout(f"stage {s + 1}", grid, f"layers.{s}.blocks.{len(stage.blocks) - 1}"))
        return TokenLayout(tuple(attention), tuple(features), readout=(("grid", 0),))

    @classmethod
    def tiny_overrides(cls, config: SwinConfig) -> dict:
        """Four stages of two blocks (plain + shifted), widths 8..64, window 4 on a 64x64 image.

        With patch 4 the stage grids are 16, 8, 4, 2: stages 0-1 have shifted, masked windows,
        stage 2 is a single window and stage 3 clips the window to 2x2, as at full size.
        """
        p = config.patch_size
        return dict(dim=8, depths=(2,) * config.num_stages, heads=tuple(min(2**i, 4) for i in range(config.num_stages)),
                    window_size=4, image_size=16 * p)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit a checkpoint's relative position bias tables to this model's windows.

        A table made for another window is resampled bicubically to the configured window
        (:func:`~vitlab.components.resample_relative_position_table`). Where this model's
        window was clipped to a small stage grid, the rows of the offsets that fit in the
        clipped window are then taken from it: exactly what the unclipped table computes on
        that grid.
        """
        configured = tuple(self.config.window_size)
        out = None
        for name, module in self.named_modules():
            if not isinstance(module, RelativePositionBias):
                continue
            key = f"{name}.table"
            table = state_dict.get(key)
            if table is None or table.ndim != 2 or table.shape[1] != module.heads or table.shape == module.table.shape:
                continue
            old_window = _table_window(table.shape[0], module.window, configured)
            if old_window is None:
                continue  # leave it to the shape-mismatch report
            if old_window != configured:
                table = resample_relative_position_table(table, configured, old_window)
            if module.window != configured:
                table = crop_relative_position_table(table, configured, module.window)
            out = dict(state_dict) if out is None else out
            out[key] = table
        return state_dict if out is None else out


def _table_window(rows: int, window: tuple[int, int], configured: tuple[int, int]) -> tuple[int, int] | None:
    """The window a bias table of ``rows`` rows was made for (a known window, or square)."""
    for cand in (configured, window):
        if (2 * cand[0] - 1) * (2 * cand[1] - 1) == rows:
            return cand
    side = math.isqrt(rows)
    if side * side == rows and side % 2 == 1:
        return ((side + 1) // 2, (side + 1) // 2)
    return None


def crop_relative_position_table(table: Tensor, old_window: tuple[int, int], new_window: tuple[int, int]) -> Tensor:
    """The rows of a ((2wh-1)(2ww-1), heads) bias table for the offsets of a smaller window."""
    oh, ow = old_window
    nh, nw = new_window
    if nh > oh or nw > ow:
        raise ValueError(f"cannot crop a bias table for window {old_window} to the larger window {new_window}")
    heads = table.shape[1]
    full = table.reshape(2 * oh - 1, 2 * ow - 1, heads)  # (rows, heads) -> (2wh-1, 2ww-1, heads)
    dh, dw = oh - nh, ow - nw
    return full[dh : dh + 2 * nh - 1, dw : dw + 2 * nw - 1].reshape(-1, heads).clone()  # -> (rows', heads)


def _variant(window: int, dim: int, depths: tuple[int, ...], heads: tuple[int, ...], image: int = 224) -> dict:
    return dict(image_size=image, patch_size=4, window_size=window, dim=dim, depths=depths, heads=heads)


def _hub(name: str, tag: str) -> str:
    return f"timm/{name}.{tag}"


register_family(
    "swin",
    SwinTransformer,
    SwinConfig,
    {
        # Default tags are timm's (the first listed per model in its default_cfgs).
        "swin_tiny_patch4_window7_224": (
            _variant(7, 96, (2, 2, 6, 2), (3, 6, 12, 24)),
            pretrained_cfg(hub_id=_hub("swin_tiny_patch4_window7_224", "ms_in1k")),
        ),
        "swin_small_patch4_window7_224": (
            _variant(7, 96, (2, 2, 18, 2), (3, 6, 12, 24)),
            pretrained_cfg(hub_id=_hub("swin_small_patch4_window7_224", "ms_in22k_ft_in1k")),
        ),
        "swin_base_patch4_window7_224": (
            _variant(7, 128, (2, 2, 18, 2), (4, 8, 16, 32)),
            pretrained_cfg(hub_id=_hub("swin_base_patch4_window7_224", "ms_in22k_ft_in1k")),
        ),
        "swin_base_patch4_window12_384": (
            _variant(12, 128, (2, 2, 18, 2), (4, 8, 16, 32), image=384),
            pretrained_cfg(input_size=384, crop_pct=1.0, hub_id=_hub("swin_base_patch4_window12_384", "ms_in22k_ft_in1k")),
        ),
        "swin_large_patch4_window7_224": (
            _variant(7, 192, (2, 2, 18, 2), (6, 12, 24, 48)),
            pretrained_cfg(hub_id=_hub("swin_large_patch4_window7_224", "ms_in22k_ft_in1k")),
        ),
    },
)
