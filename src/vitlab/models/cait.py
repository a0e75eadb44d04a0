"""CaiT (Touvron et al., 2021, "Going deeper with Image Transformers").

What the paper adds to ViT:

* **LayerScale**: every residual branch is multiplied by a learned per-channel vector
  initialised to a small value (``init_values``), which lets much deeper stacks train.
* **Talking-heads attention** in the self-attention stage: the attention logits are mixed
  linearly across heads before the softmax (``proj_l``) and the probabilities again after
  it (``proj_w``).
* **Class attention**: the self-attention stage works on the patch tokens only (no class
  token, the position embedding covers the patch grid only). The class token is inserted
  afterwards into a short class-attention stage (``depth_token_only`` blocks) where only the
  class token is updated: its query attends over [class token, patch tokens], the patch
  tokens pass through unchanged.

State-dict keys follow vitlab's shared layers (``ls1.gamma`` for timm's ``gamma_1``, a
fused ``attn.kv`` for timm's separate ``attn.k`` / ``attn.v``); the converter in
``vitlab.pretrained.convert_cait`` loads timm / original DeiT-repo checkpoints.

Attention capture: talking-heads attention records, as ``probs``, the softmax probabilities
of the proj_l-mixed logits (rows sum to 1, one map per head, what attention rollout wants);
the probabilities that actually multiply the values (after the proj_w mixing; rows need not
sum to 1 and entries may be negative) travel with them as ``info["mixed_probs"]``. Class
attention records (B, heads, 1, 1 + N) maps whose keys are [class token, patch tokens in
raster order over ``info["grid"]``] (``info["num_prefix_tokens"] == 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ..components import (
    Attention, Block, CrossAttention, DropPath, LayerScale, Mlp, AttentionLayout, FeatureLayout, PatchEmbed,
    LearnedPosEmbed, Segment, TokenGrid, TokenLayout, to_2tuple,
)
from ..config import build_config
from .base import (
    Backbone, GroupMatcher, IntermediateResult, MapTap, check_config, classifier_head, init_linears, pretrained_cfg,
)
from .masking import drop_masked_tokens
from .registry import register_family


@dataclass(frozen=True)
class CaiTConfig:
    """Configuration of a :class:`CaiT`, grouped as the model is built.

    Attributes:
        patch_size: Side of the square patches (pixels) cut by the convolutional stem.
        image_size: Training resolution, int or (H, W); fixes the grid of ``pos_embed``.
        in_channels: Number of channels of the input images.
        pad_input: Zero-pad images whose sides are not multiples of ``patch_size``;
            when False such images raise ValueError.
        dim: Width of every token, in both stages.
        heads: Number of attention heads, in both stages.
        depth: Number of talking-heads self-attention blocks (the patch-token stage).
        mlp_ratio: Self-attention-stage MLP width as a multiple of ``dim``.
        mlp_dim: Explicit self-attention-stage MLP width; overrides ``mlp_ratio`` when set.
        depth_token_only: Number of class-attention blocks (the class-token stage).
        mlp_ratio_token_only: Class-attention-stage MLP width as a multiple of ``dim``.
        init_values: LayerScale initial value (the paper's epsilon: 1e-5 up to depth 24,
            1e-6 deeper).
        qkv_bias: Use biases in the query / key / value projections.
        norm_eps: Epsilon of every LayerNorm.
        dropout: Rate for the dropouts after the position embedding, after the attention
            output projections and inside the MLPs of the self-attention stage.
        attention_dropout: Rate for dropping (mixed) attention weights, self-attention stage.
        drop_path: Stochastic depth of each self-attention block; one rate for all blocks,
            as in the paper (no linear ramp).
        drop_path_token_only: Stochastic depth of each class-attention block (0 in timm).
        num_classes: Size of the classifier; 0 leaves the model without a head.
        pool: Read-out: ``"cls"`` takes the class token (the paper), ``"mean"`` averages
            the patch tokens.
        head_dropout: Rate for the dropout right before the classifier.
    """

    # stem
    patch_size: int = 16
    image_size: int | tuple[int, int] = 224
    in_channels: int = 3
    pad_input: bool = True
    # width, shared by both stages
    dim: int = 768
    heads: int = 12
    # self-attention stage (patch tokens)
    depth: int = 12
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None
    # class-attention stage (class token)
    depth_token_only: int = 2
    mlp_ratio_token_only: float = 4.0
    # every block
    init_values: float = 1e-4
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    # regularisation
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    drop_path_token_only: float = 0.0
    # classifier
    num_classes: int = 1000
    pool: Literal["cls", "mean"] = "cls"
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", to_2tuple(self.image_size))
        check_config(
            self,
            positive=("patch_size", "in_channels", "dim", "heads", "depth", "mlp_ratio", "mlp_ratio_token_only",
                      "init_values", "norm_eps"),
            rates=("dropout", "attention_dropout", "drop_path", "drop_path_token_only", "head_dropout"),
            checks=[
                (self.mlp_dim is None or self.mlp_dim > 0,
                 f"mlp_dim must be positive (or None for dim * mlp_ratio), got {self.mlp_dim}"),
                (self.depth_token_only >= 1, f"depth_token_only must be >= 1 (the class token is read out after class "
                                             f"attention), got {self.depth_token_only}"),
                (self.heads <= 0 or self.dim % self.heads == 0, f"dim ({self.dim}) must be divisible by heads ({self.heads})"),
                (self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}"),
                (min(self.image_size) >= self.patch_size,
                 f"image_size {self.image_size} is smaller than patch_size {self.patch_size}"),
            ],
        )

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width of the self-attention stage."""
        return self.mlp_dim if self.mlp_dim is not None else int(self.dim * self.mlp_ratio)


def mix_heads(proj: nn.Linear, scores: Tensor) -> Tensor:
    """Apply a (heads -> heads) linear map across the head axis of (B, heads, Nq, Nk) scores."""
    # (B, heads, Nq, Nk) -> (B, Nq, Nk, heads) -> mix -> (B, heads, Nq, Nk)
    return proj(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TalkingHeadsAttention(Attention):
    """Self-attention with talking heads (Shazeer et al., 2020), as used by CaiT.

    The scaled logits are mixed across heads by ``proj_l`` before the softmax, the
    probabilities by ``proj_w`` after it; the mixed probabilities multiply the values. Both
    mixes go through :meth:`AttentionBase.attend`'s ``logits_fn`` / ``probs_fn`` hooks, so this
    attention always takes the explicit path.

    Capture (done by ``attend``): the record's ``probs`` are the softmax probabilities (rows
    sum to 1); the ``proj_w``-mixed ones that multiply the values are in ``info["mixed_probs"]``.

    An ``attn_bias`` (token merging's ``log(size)`` per key) is added to the *mixed* logits, right
    before the softmax: added before ``proj_l`` it would be mixed across heads too, and a merged
    key of size s would no longer count exactly s times.
    """

    def __init__(self, dim: int, heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        self.capture_info = dict(grid=grid, num_prefix_tokens=0, talking_heads=True)
        q, k, v = self.qkv_heads(x)
        mix: Callable[[Tensor], Tensor] = partial(mix_heads, self.proj_l)
        if attn_bias is not None:
            mix = partial(_mix_then_add, self.proj_l, attn_bias)
        out = self.attend(q, k, v, logits_fn=mix, probs_fn=partial(mix_heads, self.proj_w))
        return self.project(out)


def _mix_then_add(proj: nn.Linear, bias: Tensor, scores: Tensor) -> Tensor:
    return mix_heads(proj, scores) + bias


class ClassAttention(CrossAttention):
    """Class attention: the class token's query attends over [class token, patch tokens]."""

    def forward(self, x_cls: Tensor, tokens: Tensor, grid: tuple[int, int] | None = None,  # type: ignore[override]
                attn_bias: Tensor | None = None) -> Tensor:
        """(B, 1, C) class token, (B, 1 + N, C) normed [cls, patches] -> (B, 1, C) update.

        ``attn_bias`` (broadcastable to (B, heads, 1, 1 + N)) is added to the key logits.
        """
        self.capture_info = dict(grid=grid, num_prefix_tokens=1, query="class_token")
        return super().forward(x_cls, tokens, attn_bias)


class ClassAttentionBlock(nn.Module):
    """A class-attention block: only the class token is updated, the patch tokens are read-only.

    ``cls + DropPath(LS(class_attn(norm1([cls, x]))))`` then ``cls + DropPath(LS(mlp(norm2(cls))))``.

    Token merging (:mod:`vitlab.components.tome`) passes the merged patch tokens and their
    ``size``: proportional attention adds ``log(size)`` to their key logits (0 for the class
    token), so a merged token counts as the ``size`` patches it stands for.
    """

    #: :func:`~vitlab.components.tome.apply_tome` hands this block the merged tokens' sizes.
    reads_merged_tokens = True

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool = True, init_values: float = 1e-4,
                 drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_dim)
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_cls: Tensor, tokens: Tensor, grid: tuple[int, int] | None = None,
                size: Tensor | None = None) -> Tensor:
        """(B, 1, C) class token and (B, N, C) patch tokens -> updated (B, 1, C) class token.

        ``size`` (B, N, 1): patches per token (token merging), for proportional attention.
        """
        u = self.norm1(torch.cat([x_cls, tokens], dim=1))  # (B, 1 + N, C)
        bias = None
        if size is not None:
            # (B, N, 1) -> (B, 1, 1, 1 + N): log(size) per patch-token key, 0 for the class token
            bias = torch.cat([size.new_zeros(size.shape[0], 1), size[..., 0].log()], dim=1)[:, None, None].to(u.dtype)
        x_cls = x_cls + self.drop_path(self.ls1(self.attn(u[:, :1], u, grid=grid, attn_bias=bias)))
        return x_cls + self.drop_path(self.ls2(self.mlp(self.norm2(x_cls))))



class CaiT(Backbone):
    """CaiT classifier/backbone following vitlab's backbone contract.

    ``forward_features`` returns the normed tokens (B, 1 + N, C) with the class token first
    (as timm does); ``forward_intermediates`` returns patch-token maps after self-attention
    blocks (the class-attention stage never changes the patch tokens).

    Args:
        config: A :class:`CaiTConfig`; keyword arguments override its fields.

    Example:
        >>> model = CaiT(CaiTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4))
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 1000])
    """

    family = "cait"
    config_class = CaiTConfig
    num_prefix_tokens = 1
    no_weight_decay_names = ("pos_embed", "cls_token")

    def __init__(self, config: CaiTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(self.config_class, vars(config) if config is not None else {}, **overrides)
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, c.dim, pad_input=c.pad_input)
        self.grid_size = self.patch_embed.grid_size(c.image_size)
        self.num_features = c.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = LearnedPosEmbed(self.grid_size, c.dim)  # patches only
        self.pos_drop = nn.Dropout(c.dropout)
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        self.blocks = nn.ModuleList(
            Block(
                c.dim, c.heads, c.hidden_dim, dropout=c.dropout, drop_path=c.drop_path, layer_scale=c.init_values,
                norm_layer=norm,
                attn=TalkingHeadsAttention(c.dim, c.heads, qkv_bias=c.qkv_bias, attn_drop=c.attention_dropout,
                                           proj_drop=c.dropout),
            )
            for _ in range(c.depth)
        )
        self.blocks_token_only = nn.ModuleList(
            ClassAttentionBlock(c.dim, c.heads, int(c.dim * c.mlp_ratio_token_only), qkv_bias=c.qkv_bias,
                                init_values=c.init_values, drop_path=c.drop_path_token_only, norm_layer=norm)
            for _ in range(c.depth_token_only)
        )
        self.norm = norm(c.dim)
        self.head_drop = nn.Dropout(c.head_dropout)
        self.head = classifier_head(c.dim, c.num_classes)
        self.feature_info = [dict(num_chs=c.dim, reduction=c.patch_size, module=f"blocks.{i}") for i in range(c.depth)]
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0], crop_pct=1.0)
        self.init_weights()

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """timm's scheme: truncated normal (std 0.02) for linears, tokens and position embedding."""
        self.pos_embed.init_weights(std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_linears(self)

    # ------------------------------------------------------------- features
    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The patch position embedding for a token grid, resampled (bicubic) if the grid is new."""
        return self.pos_embed(grid)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image (B, C, H, W) -> patch tokens with position embedding (B, N, C), and the grid."""
        x, grid = self.patch_embed(x)  # (B, N, C)
        return self.pos_drop(x + self.position_embedding(grid)), grid

    def forward_cls(self, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        """Class-attention stage: patch tokens (B, N, C) -> [class token, patch tokens] (B, 1 + N, C)."""
        x_cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        for blk in self.blocks_token_only:
            x_cls = self.run_checkpointed(blk, x_cls, x, grid=grid)
        return torch.cat([x_cls, x], dim=1)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image -> normed tokens (B, 1 + N, C), class token first.

        With a ``mask`` (B, N) (True: hidden) the hidden patch tokens are dropped after the
        position embedding is added (MAE): the self-attention stage runs on the visible
        tokens only, the class-attention stage reads them unchanged, and the output is
        (B, 1 + N_visible, C). Every row must hide the same number of patches.
        """
        x, grid = self.embed(x)
        if mask is not None:
            x = drop_masked_tokens(x, mask)  # (B, N, C) -> (B, N_visible, C)
            grid = None  # the visible tokens no longer form a grid
        for blk in self.blocks:
            x = self.run_checkpointed(blk, x, grid=grid)
        return self.norm(self.forward_cls(x, grid))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, 1 + N, C) -> logits (or the pooled pre-logit features)."""
        x = x[:, 1:].mean(dim=1) if self.config.pool == "mean" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Patch-token maps (B, C, H', W') after the chosen self-attention blocks, and the final tokens.

        ``norm`` applies the final norm to each returned map's tokens.
        """
        x, grid = self.embed(x)
        tap = MapTap(take, (lambda i: self.norm) if norm else None)
        for i in range(take[-1] + 1 if stop_early else len(self.blocks)):
            x = tap(i, self.run_checkpointed(self.blocks[i], x, grid=grid), grid)
        final = None if stop_early else self.norm(self.forward_cls(x, grid))
        return final, tap.result()

    # ------------------------------------------------------------- contract
    def group_matcher(self) -> GroupMatcher:
        """Stem: tokens and embeddings; one group per self-attention block, then per class-attention block."""
        return dict(stem=r"^(cls_token|pos_embed|patch_embed)",
                    blocks=[(r"^blocks\.(\d+)", (0,)), (r"^blocks_token_only\.(\d+)", (1,))])

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Self-attention over the patch grid, then class attention of the class token over [cls, grid]."""
        pe = self.patch_embed
        grid = Segment(("grid", 0), TokenGrid(pe.grid_size(tuple(image_size)), (float(pe.stride[0]), float(pe.stride[1]))))
        cls = Segment(("cls", 0))
        n = len(self.blocks)
        attention = [AttentionLayout(f"blocks.{i}.attn", f"block {i + 1}", "self", (grid,), (grid,)) for i in range(n)]
        attention += [AttentionLayout(f"blocks_token_only.{j}.attn", f"class-attention block {j + 1}", "class",
                                      (cls,), (cls, grid)) for j in range(len(self.blocks_token_only))]
        return TokenLayout(
            tuple(attention),
            tuple(FeatureLayout(f"block {i + 1}", grid.grid, f"blocks.{i}", 0) for i in range(n)),
            readout=(("grid", 0),) if self.config.pool == "mean" else (("cls", 0),),
            default_queries=("cls",),
        )

    @classmethod
    def tiny_overrides(cls, config: CaiTConfig) -> dict[str, Any]:
        """Same stages and patch size; 2 SA blocks of width 8 per head (>= 2 heads), a 4x3 patch grid."""
        heads = max(2, min(config.heads, 4))
        p = config.patch_size
        return dict(dim=8 * heads, heads=heads, depth=2, mlp_dim=None, image_size=(4 * p, 3 * p))


def _variant(image_size: int, dim: int, depth: int, heads: int, init_values: float, tag: str):
    return (dict(image_size=image_size, patch_size=16, dim=dim, depth=depth, heads=heads, init_values=init_values),
            pretrained_cfg(input_size=image_size, crop_pct=1.0, hub_id=tag))


register_family(
    "cait",
    CaiT,
    CaiTConfig,
    {
        name: _variant(*args, tag=f"timm/{name}.fb_dist_in1k")
        for name, args in {
            "cait_xxs24_224": (224, 192, 24, 4, 1e-5),
            "cait_xxs36_224": (224, 192, 36, 4, 1e-5),
            "cait_xs24_384": (384, 288, 24, 6, 1e-5),
            "cait_s24_224": (224, 384, 24, 8, 1e-5),
            "cait_s36_384": (384, 384, 36, 8, 1e-6),
        }.items()
    },
)
