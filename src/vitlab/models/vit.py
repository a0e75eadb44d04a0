"""Vision Transformer (Dosovitskiy et al., 2021): patch tokens, a class token, a stack of blocks.

State-dict keys follow timm's layout (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.attn.qkv`` ...), so timm checkpoints load without renaming.

ViTDet's backbone options (Li et al., 2022, "Exploring Plain Vision Transformer Backbones for
Object Detection"): ``window_size`` > 0 puts most blocks on non-overlapping windows (the grid
zero-padded to a multiple of the window, no shift) and keeps global attention in
``global_blocks``; ``rel_pos="decomposed"`` adds MViTv2's decomposed relative position to every
block's logits (``blocks.N.attn.rel_pos.rel_pos_h`` / ``rel_pos_w``). ViTDet-B/L/H are the
``vit_*`` variants with these overrides (no variant of its own is registered)::

    create_model("vit_base_patch16_224", num_classes=0, class_token=False, pool="mean", image_size=1024,
                 window_size=14, global_blocks=(2, 5, 8, 11), rel_pos="decomposed")
    # ViTDet-L: vit_large_patch16_224 with global_blocks=(5, 11, 17, 23);
    # ViTDet-H: vit_huge_patch14_224 (patch 14 like MAE's ViT-H) with global_blocks=(7, 15, 23, 31)

Plain ViT / MAE checkpoints load into such a model: the class token is dropped, the position
embedding loses its class row and is resampled to the grid, and with ``pool="mean"`` the
pooling norm ``fc_norm`` keeps its initialisation (warned) when the checkpoint has none (its final
``norm`` is dropped), and so do the relative position tables (zero, as in detectron2).
``forward_intermediates(x, indices=[depth - 1])`` gives the last map (B, C, H/16, W/16) before
any norm, what ViTDet's simple feature pyramid reads. Hugging Face ``VitDet*`` weights convert
with :func:`vitlab.pretrained.convert_vitdet.vitdet_hf_to_vitlab`.

Register tokens (Darcet et al., 2024, "Vision Transformers Need Registers"): ``reg_tokens=R``
adds R learned tokens ``reg_token`` (1, R, C) after the class token and before the patches, with
no position embedding (``no_embed_class``: the position embedding covers the patches only, and
the class token gets none either). No head reads them and mean pooling skips them; they give
the model somewhere other than background patches to store global information, which removes
the high-norm artifact tokens from attention maps (explainability shows them as prefix tokens
``reg0`` .. ``reg{R-1}``). timm's ``vit_*_reg4_*`` checkpoints load unconverted. A plain ViT /
DeiT checkpoint loads into a register model (fine-tuning with registers added, e.g.
``create_model(name, pretrained=path, reg_tokens=4)`` or ``vitlab train model.pretrained=PATH``):
the registers keep their fresh initialisation and the class token's position row is dropped
(``no_embed_class``) or kept, with one warning (:meth:`VisionTransformer.add_registers`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Literal

import math
import warnings

import torch
from torch import Tensor, nn

from ..components import (
    ACT_LAYERS, Attention, AttentionLayout, Block, FeatureLayout, LinearPatchEmbed, PatchEmbed, Segment, TokenGrid,
    TokenLayout, LearnedPosEmbed, WindowAttention, drop_path_rates, sincos_2d_pos_embed, to_2tuple,
)
from ..components.embeddings import DecomposedRelPos, resize_rel_pos
from ..config import build_config
from .base import (
    INCEPTION_MEAN, INCEPTION_STD, Backbone, GroupMatcher, IntermediateResult, MapTap, check_config, classifier_head,
    init_linears, pretrained_cfg,
)
from .registry import register_family


@dataclass(frozen=True)
class ViTConfig:
    """Configuration of a :class:`VisionTransformer`.

    Attributes:
        image_size: Default input size (int or (H, W)); the position embedding's grid.
        patch_size: Patch side in pixels.
        in_channels: Image channels.
        num_classes: Classifier outputs; 0 for no head (features only).
        dim: Token width.
        depth: Number of blocks.
        heads: Attention heads.
        mlp_dim: Hidden width of the MLPs.
        dropout: Dropout after the position embedding, in the MLPs and after attention.
        attention_dropout: Dropout on the attention probabilities.
        drop_path: Stochastic-depth rate of the last block (linearly increasing from 0).
        qkv_bias: Bias in the qkv projection.
        pool: ``"cls"`` (class token) or ``"mean"`` (mean of the patch tokens).
        class_token: Prepend a learned class token.
        representation_size: Width of the optional pre-logits layer (Linear + tanh).
        layer_scale: Init value of LayerScale in every block; None for none.
        pos_embed: ``"learned"``, ``"sincos"`` (fixed 2-D) or ``"none"``.
        patch_embed: ``"conv"`` or ``"linear"`` (the paper's flattened-patch form).
        pad_input: Pad inputs that are not a multiple of the patch size (else raise).
        norm_eps: LayerNorm epsilon.
        fc_norm: Norm after pooling instead of before it; default: True when pool is "mean".
        head_dropout: Dropout before the classifier.
        pre_norm: LayerNorm on the embedded tokens before the first block (CLIP's
            ``pre_layrnorm``; timm's ``norm_pre``).
        act: MLP activation, ``"gelu"`` or ``"quick_gelu"`` (OpenAI CLIP).
        patch_bias: Bias in the patch-embedding convolution (CLIP has none).
        window_size: Side of the attention windows (ViTDet); 0 for global attention in every
            block. With a window, every block not in ``global_blocks`` attends within
            non-overlapping ``window_size`` x ``window_size`` windows of the token grid, which is
            zero-padded (after the block's norm) to a multiple of the window and never shifted or
            clipped (detectron2's rule). Needs ``class_token=False``.
        global_blocks: Indices (0-based) of the blocks that keep global attention when
            ``window_size`` > 0: ViTDet-B (2, 5, 8, 11), -L (5, 11, 17, 23), -H (7, 15, 23, 31).
        rel_pos: ``"decomposed"`` adds MViTv2 / ViTDet's decomposed relative position to the
            logits of every block (tables for the window in windowed blocks, for the token grid
            at ``image_size`` in global blocks, resized linearly on another grid); ``"none"``.
        reg_tokens: Register tokens (Darcet et al.) put after the class token and before the
            patches; read by no head and skipped by mean pooling (timm's ``reg_token``, (1, R, C)).
        no_embed_class: The position embedding covers the patch tokens only, so the prefix
            tokens (class, registers) get none (timm's ``no_embed_class``: its register and DeiT-3
            models); None: True when ``reg_tokens`` > 0, else False (the class token has a row).
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    qkv_bias: bool = True
    pool: Literal["cls", "mean"] = "cls"
    class_token: bool = True
    representation_size: int | None = None
    layer_scale: float | None = None
    pos_embed: Literal["learned", "sincos", "none"] = "learned"
    patch_embed: Literal["conv", "linear"] = "conv"
    pad_input: bool = True
    norm_eps: float = 1e-6
    fc_norm: bool | None = None
    head_dropout: float = 0.0
    pre_norm: bool = False
    act: Literal["gelu", "quick_gelu"] = "gelu"
    patch_bias: bool = True
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    rel_pos: Literal["none", "decomposed"] = "none"
    reg_tokens: int = 0
    no_embed_class: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", to_2tuple(self.image_size))
        if isinstance(self.global_blocks, (list, tuple)):
            object.__setattr__(self, "global_blocks", tuple(self.global_blocks))
        blocks_ok = isinstance(self.global_blocks, tuple) and all(
            isinstance(i, int) and 0 <= i < self.depth for i in self.global_blocks)
        check_config(
            self,
            positive=("patch_size", "in_channels", "dim", "depth", "heads", "mlp_dim"),
            rates=("dropout", "attention_dropout", "drop_path", "head_dropout"),
            checks=[
                (self.heads <= 0 or self.dim % self.heads == 0, f"dim ({self.dim}) must be divisible by heads ({self.heads})"),
                (self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}"),
                (self.pool != "cls" or self.class_token,
                 "pool='cls' needs class_token=True; use pool='mean' without a class token"),
                (self.pos_embed in ("learned", "sincos", "none"),
                 f"pos_embed must be 'learned', 'sincos' or 'none', got {self.pos_embed!r}"),
                (self.act in ACT_LAYERS, f"act must be one of {sorted(ACT_LAYERS)}, got {self.act!r}"),
                (self.patch_embed in ("conv", "linear"), f"patch_embed must be 'conv' or 'linear', got {self.patch_embed!r}"),
                (all(s >= self.patch_size for s in self.image_size),
                 f"image_size {self.image_size} is smaller than patch_size {self.patch_size}"),
                (isinstance(self.window_size, int) and self.window_size >= 0,
                 f"window_size must be an int >= 0 (0: global attention everywhere), got {self.window_size!r}"),
                (self.window_size == 0 or not self.class_token,
                 "window attention (window_size > 0) needs class_token=False: prefix tokens (class / distillation) "
                 "cannot be windowed; use pool='mean'"),
                (blocks_ok,
                 f"global_blocks must be block indices in [0, depth={self.depth}), got {self.global_blocks!r}"),
                (not self.global_blocks or self.window_size > 0,
                 f"global_blocks {self.global_blocks} only apply with window attention (window_size > 0); "
                 "with window_size=0 every block is global, so leave global_blocks empty"),
                (self.rel_pos in ("none", "decomposed"),
                 f"rel_pos must be 'none' or 'decomposed', got {self.rel_pos!r}"),
                (isinstance(self.reg_tokens, int) and not isinstance(self.reg_tokens, bool) and self.reg_tokens >= 0,
                 f"reg_tokens must be an int >= 0 (0: no register tokens), got {self.reg_tokens!r}"),
                (self.window_size == 0 or not self.reg_tokens,
                 "window attention (window_size > 0) cannot take register tokens (reg_tokens > 0): prefix tokens "
                 "cannot be windowed"),
                (self.no_embed_class in (None, True, False),
                 f"no_embed_class must be True, False or None (True with registers), got {self.no_embed_class!r}"),
            ],
        )

    def embeds_prefix(self) -> bool:
        """Whether the position embedding has rows for the prefix tokens (``no_embed_class`` resolved)."""
        return not (self.no_embed_class if self.no_embed_class is not None else self.reg_tokens > 0)

    def is_windowed(self, block: int) -> bool:
        """Whether block ``block`` attends within windows (``window_size`` > 0 and not a global block)."""
        return self.window_size > 0 and block not in self.global_blocks


class VisionTransformer(Backbone):
    """ViT classifier/backbone following vitlab's backbone contract.

    Args:
        config: A :class:`ViTConfig`; keyword arguments override its fields.

    Example:
        >>> model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=64, depth=2, heads=2, mlp_dim=128))
        >>> model(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 1000])
    """

    family = "vit"
    config_class = ViTConfig
    num_distill_tokens = 0
    no_weight_decay_names = ("pos_embed", "cls_token", "dist_token", "reg_token")
    head_names = ("fc_norm", "pre_logits", "head")

    def __init__(self, config: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(self.config_class, vars(config) if config is not None else {}, **overrides)
        self.config = c = config
        self.patch_embed = self.build_patch_embed(c)
        self.grid_size = self.patch_embed.grid_size(c.image_size)
        if c.reg_tokens and self.num_distill_tokens:
            raise ValueError(f"reg_tokens={c.reg_tokens}: register tokens are not supported with a distillation token "
                             "(the distilled DeiT's heads read tokens 0 and 1, and timm's distilled DeiT has no "
                             "registers); use reg_tokens=0, or a ViT / non-distilled DeiT with registers")
        #: Register tokens (Darcet et al.), after the class / distillation tokens.
        self.num_reg_tokens = c.reg_tokens
        self.num_prefix_tokens = int(c.class_token) + self.num_distill_tokens + c.reg_tokens
        #: Rows of the position embedding before the grid rows (0 with ``no_embed_class``).
        self.num_pos_prefix = self.num_prefix_tokens if c.embeds_prefix() else 0
        self.num_features = c.representation_size or c.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.dim)) if c.reg_tokens else None
        self.pos_embed: LearnedPosEmbed | Tensor | None
        if c.pos_embed == "learned":
            self.pos_embed = LearnedPosEmbed(self.grid_size, c.dim, self.num_pos_prefix)
        elif c.pos_embed == "sincos":
            fixed = torch.cat([torch.zeros(self.num_pos_prefix, c.dim), sincos_2d_pos_embed(c.dim, self.grid_size)])
            self.register_buffer("pos_embed", fixed.unsqueeze(0), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(c.dropout)
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        self.norm_pre = norm(c.dim) if c.pre_norm else nn.Identity()
        rates = drop_path_rates(c.drop_path, [c.depth])[0]
        self.blocks = nn.ModuleList(
            Block(
                c.dim, c.heads, c.mlp_dim, qkv_bias=c.qkv_bias, dropout=c.dropout,
                attention_dropout=c.attention_dropout, drop_path=r, layer_scale=c.layer_scale, norm_layer=norm,
                act_layer=ACT_LAYERS[c.act], attn=self.vitdet_attention(i),
            )
            for i, r in enumerate(rates)
        )
        #: Blocks need the token grid (window attention, decomposed relative position).
        self.needs_grid = c.window_size > 0 or c.rel_pos != "none"
        use_fc_norm = c.fc_norm if c.fc_norm is not None else c.pool == "mean"
        self.norm = nn.Identity() if use_fc_norm else norm(c.dim)
        self.fc_norm = norm(c.dim) if use_fc_norm else nn.Identity()
        if c.representation_size:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(c.dim, c.representation_size), act=nn.Tanh()))
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(c.head_dropout)
        self.head = classifier_head(self.num_features, c.num_classes)
        reduction = self.patch_embed.stride[0]  # input pixels per token (the patch size; a hybrid's CNN stride x patch)
        self.feature_info = [dict(num_chs=c.dim, reduction=reduction, module=f"blocks.{i}") for i in range(c.depth)]
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0], mean=INCEPTION_MEAN, std=INCEPTION_STD)
        self.init_weights()

    def build_patch_embed(self, c: ViTConfig) -> PatchEmbed:
        """The patch embedding: a :class:`PatchEmbed` (or a subclass, e.g. a hybrid's CNN stem) whose
        ``grid_size(image_size)`` sizes the position embedding and whose ``stride`` is the input pixels per token."""
        embed_cls = LinearPatchEmbed if c.patch_embed == "linear" else PatchEmbed
        return embed_cls(c.patch_size, c.in_channels, c.dim, bias=c.patch_bias, pad_input=c.pad_input)

    def vitdet_attention(self, block: int) -> nn.Module | None:
        """Block ``block``'s attention under ViTDet's options (windows, decomposed relative position);
        None for the plain self-attention the block builds itself."""
        c = self.config
        windowed = c.is_windowed(block)
        if not windowed and c.rel_pos == "none":
            return None
        size = (c.window_size, c.window_size) if windowed else self.grid_size
        rel_pos = DecomposedRelPos(size, c.dim // c.heads) if c.rel_pos == "decomposed" else None
        if windowed:
            return WindowAttention(c.dim, c.heads, c.window_size, 0, qkv_bias=c.qkv_bias, attn_drop=c.attention_dropout,
                                   proj_drop=c.dropout, relative_position_bias=False, clip=False, rel_pos=rel_pos)
        return Attention(c.dim, c.heads, qkv_bias=c.qkv_bias, attn_drop=c.attention_dropout, proj_drop=c.dropout,
                         rel_pos=rel_pos)

    def block_kwargs(self, grid: tuple[int, int]) -> dict:
        """Keyword arguments of every block call: the token grid where the attention needs it."""
        return dict(grid=tuple(grid)) if self.needs_grid else {}

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """timm's default scheme: truncated normal (std 0.02) for linears and position embedding."""
        if isinstance(self.pos_embed, LearnedPosEmbed):
            self.pos_embed.init_weights(std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        init_linears(self)

    # ------------------------------------------------------------- features
    def prefix_tokens(self, batch: int) -> list[Tensor]:
        """The learned tokens put before the patch tokens, in order: the class token (B, 1, C), then
        the register tokens (B, R, C)."""
        out = [self.cls_token.expand(batch, -1, -1)] if self.cls_token is not None else []
        if self.reg_token is not None:
            out.append(self.reg_token.expand(batch, -1, -1))
        return out

    def prefix_names(self) -> list[str]:
        """Names of the prefix tokens, in order (``cls``, ``dist``, ``reg0`` .. ``reg{R-1}``)."""
        return (["cls"] * int(self.cls_token is not None) + ["dist"] * self.num_distill_tokens
                + [f"reg{i}" for i in range(self.num_reg_tokens)])

    def position_embedding(self, grid: tuple[int, int]) -> Tensor | None:
        """The position embedding for a token grid, resampled (bicubic) if the grid is new."""
        if self.pos_embed is None:
            return None
        if self.config.pos_embed == "sincos" and tuple(grid) != tuple(self.grid_size):
            pe = sincos_2d_pos_embed(self.config.dim, grid).to(self.pos_embed)
            return torch.cat([self.pos_embed[:, : self.num_pos_prefix], pe.unsqueeze(0)], dim=1)
        return self.pos_embed(grid)

    def embed(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Image (B, C, H, W) -> tokens with prefix and position embedding (B, P + N, C), grid.

        The prefix tokens get position rows only when the embedding has them (not with
        ``no_embed_class``, e.g. register models). With a ``mask`` (B, N) (True: hidden) the
        hidden patch tokens are dropped after the position embedding is added (MAE); every row
        must hide the same number of patches.
        """
        x, grid = self.patch_embed(x)  # (B, N, C)
        if mask is not None and self.needs_grid:
            raise ValueError("a ViT with window attention or decomposed relative position needs every patch token; "
                             "masked (MAE) forward is not supported with window_size > 0 or rel_pos='decomposed'")
        pos = self.position_embedding(grid)
        p = self.num_pos_prefix
        if pos is not None:
            x = x + pos[:, p:]
        if mask is not None:
            x = self.drop_masked(x, mask)
        prefix = self.prefix_tokens(x.shape[0])
        if prefix:
            prefix_t = torch.cat(prefix, dim=1)  # (B, P, C)
            if pos is not None and p:
                prefix_t = prefix_t + pos[:, :p]
            x = torch.cat([prefix_t, x], dim=1)  # (B, P + N, C)
        return self.norm_pre(self.pos_drop(x)), grid

    @staticmethod
    def drop_masked(x: Tensor, mask: Tensor) -> Tensor:
        """Keep the patch tokens (B, N, C) whose ``mask`` (B, N) entry is False -> (B, N_keep, C)."""
        b, n, c = x.shape
        if mask.shape != (b, n) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a boolean tensor of shape (B, N) = ({b}, {n}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        keep = (~mask).sum(dim=1)
        if (keep != keep[0]).any():
            raise ValueError(f"every image must hide the same number of patches, got {(n - keep).tolist()}")
        return x[~mask].reshape(b, int(keep[0]), c)  # (B * N_keep, C) -> (B, N_keep, C)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Image -> normed tokens (B, P + N, C), prefix tokens first (only the visible patches with ``mask``)."""
        x, grid = self.embed(x, mask)
        kwargs = self.block_kwargs(grid)
        for blk in self.blocks:
            x = self.run_checkpointed(blk, x, **kwargs)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        """(B, P + N, C) -> (B, C): the class token, or the mean of the patch tokens (registers excluded)."""
        if self.config.pool == "mean":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits (or the pooled, normed pre-logit features)."""
        x = self.pre_logits(self.fc_norm(self.pool(x)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Maps (B, C, H', W') after the chosen blocks and the final tokens (see :meth:`Backbone.forward_intermediates`)."""
        x, grid = self.embed(x)
        tap = MapTap(take, (lambda i: self.norm) if norm else None)
        last = take[-1] if stop_early else len(self.blocks) - 1
        kwargs = self.block_kwargs(grid)
        for i in range(last + 1):
            x = tap(i, self.run_checkpointed(self.blocks[i], x, **kwargs), grid, self.num_prefix_tokens)
        final = None if stop_early else self.norm(x)
        return final, tap.result()

    # ------------------------------------------------------------- contract
    def group_matcher(self) -> GroupMatcher:
        """Stem: tokens, position and patch embedding; then one group per block."""
        return dict(stem=r"^(cls_token|dist_token|reg_token|pos_embed|patch_embed)", blocks=[(r"^blocks\.(\d+)", None)])

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """[prefix tokens (class, distillation, registers), patch grid] in every block (windows in ViTDet's windowed
        blocks); maps after every block. The read-out is the class (and distillation) token, never a register."""
        pe = self.patch_embed
        shape = pe.grid_size(tuple(image_size))
        grid = TokenGrid(shape, (float(pe.stride[0]), float(pe.stride[1])))
        prefix = tuple(Segment((n, 0)) for n in self.prefix_names())
        segs = (*prefix, Segment(("grid", 0), grid))
        n = len(self.blocks)
        blind = self.config.pool == "cls"
        readout = (("grid", 0),) if self.config.pool == "mean" else tuple(
            s.key for s in prefix if s.key[0] in ("cls", "dist"))

        def attention(i: int) -> AttentionLayout:
            attn = self.blocks[i].attn
            if isinstance(attn, WindowAttention):
                window, shift = attn.layout(shape)
                return AttentionLayout(f"blocks.{i}.attn", f"block {i + 1} (windows)", "window", segs, segs,
                                       window, shift)
            return AttentionLayout(f"blocks.{i}.attn", f"block {i + 1}", "self", segs, segs)

        return TokenLayout(
            attention=tuple(attention(i) for i in range(n)),
            features=tuple(FeatureLayout(f"block {i + 1}", grid, f"blocks.{i}", len(prefix), not (blind and i == n - 1))
                           for i in range(n)),
            readout=readout,
            default_queries=tuple(k[0] for k in readout if k[0] != "grid"),
        )

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit a checkpoint to this ViT: the position embedding (see :meth:`Backbone.adapt_state_dict`) and
        what a ViTDet-style backbone (``class_token=False``, ``pool="mean"``) does not share with a plain ViT.

        * ``cls_token`` is dropped when the model has no class token (its position row is dropped by
          :meth:`~vitlab.components.LearnedPosEmbed.fit`).
        * With ``fc_norm`` and no final norm, a checkpoint without ``fc_norm`` (a class-token ViT, an
          MAE encoder, a ViTDet backbone) loads with ``fc_norm`` at its initialisation (warned), as MAE
          fine-tuning does; the checkpoint's final ``norm``, if any, is dropped.
        * Decomposed relative position tables made for another grid or window are resized linearly
          (:func:`~vitlab.components.embeddings.resize_rel_pos`, detectron2's rule); a checkpoint with
          none at all (a plain ViT / MAE) leaves them at their zero initialisation (warned).
        """
        sd = dict(super().adapt_state_dict(self.add_registers(state_dict)))
        own = self.state_dict()
        if self.cls_token is None:
            sd.pop("cls_token", None)
        pool_norm = ("fc_norm.weight", "fc_norm.bias")
        if isinstance(self.norm, nn.Identity) and "fc_norm.weight" in own and not any(k in sd for k in pool_norm):
            dropped = [k for k in ("norm.weight", "norm.bias") if sd.pop(k, None) is not None]
            sd.update({k: own[k] for k in pool_norm if k in own})
            warnings.warn("checkpoint has no fc_norm (the pooling norm that pool='mean' reads): fc_norm keeps its "
                          "initialisation" + (", the checkpoint's final norm is dropped" if dropped else ""),
                          stacklevel=3)
        tables = [k for k in own if ".rel_pos.rel_pos_" in k]
        if tables and not any(k in sd for k in tables):
            sd.update({k: own[k] for k in tables})
            warnings.warn("checkpoint has no decomposed relative position tables (rel_pos='decomposed'): they keep "
                          "their initialisation (zero), as ViTDet does from MAE weights", stacklevel=3)
        for key in tables:
            table = sd.get(key)
            if table is not None and table.ndim == 2 and table.shape != own[key].shape \
                    and table.shape[1] == own[key].shape[1]:
                sd[key] = resize_rel_pos(table, own[key].shape[0])
        return sd

    def add_registers(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint without register tokens (a plain ViT / DeiT) made to fit this register model.

        ``reg_token`` keeps this model's own initialisation (normal, std 1e-6: fresh registers
        for fine-tuning). A learned position embedding laid out ``[class row, grid]`` (or
        ``[grid]``) loses its class row with ``no_embed_class`` (this model's prefix tokens get
        no position) or, without it, keeps it and gets this model's own register rows after it
        (truncated normal, std 0.02); the grid rows are resampled later as usual. One warning
        names what was initialised. Any other checkpoint is returned as it is.
        """
        if self.reg_token is None or "reg_token" in state_dict:
            return state_dict
        sd, own, r = dict(state_dict), self.state_dict(), self.num_reg_tokens
        sd["reg_token"] = own["reg_token"]
        notes = [f"reg_token ({r} register tokens) keeps the model's fresh initialisation (normal, std 1e-6)"]
        pos = sd.get("pos_embed")
        if isinstance(self.pos_embed, LearnedPosEmbed) and isinstance(pos, Tensor) and pos.ndim == 3:
            n, grid_n = pos.shape[1], self.grid_size[0] * self.grid_size[1]

            def is_grid(m: int) -> bool:  # rows of a patch grid: this model's, or any square one
                return m == grid_n or (m > 0 and math.isqrt(m) ** 2 == m)

            class_row = "cls_token" in sd and is_grid(n - 1)
            if class_row or is_grid(n):
                grid_rows = pos[:, int(class_row):]  # (1, n_grid, C)
                if self.num_pos_prefix == 0:
                    sd["pos_embed"] = grid_rows
                    if class_row:
                        notes.append("the class token's position row is dropped (no_embed_class: the position "
                                     "embedding covers the patches only)")
                else:
                    mine = own["pos_embed"]  # (1, P + N, C): [cls row, register rows, grid]
                    c = int(self.cls_token is not None)
                    cls_rows = (pos[:, :1] if class_row else mine[:, :1])[:, :c]
                    sd["pos_embed"] = torch.cat([cls_rows, mine[:, c: c + r], grid_rows], dim=1)  # (1, P + n_grid, C)
                    notes.append(f"the position embedding gets {r} register rows at the model's initialisation "
                                 "(truncated normal, std 0.02)" + (", the class row is kept" if class_row else ""))
        if self.cls_token is None and "cls_token" in sd:
            notes.append("the class token is dropped (class_token=False)")
        warnings.warn("checkpoint has no register tokens (a plain ViT / DeiT, reg_tokens=0) for a model with "
                      f"reg_tokens={r}: " + "; ".join(notes), stacklevel=4)
        return sd

    @classmethod
    def tiny_overrides(cls, config: ViTConfig) -> dict:
        """Same tokens, pooling and patch size; 2 blocks of width 8 per head, a 4x3 patch grid."""
        heads = min(config.heads, 4)
        p = config.patch_size
        out = dict(dim=8 * heads, heads=heads, depth=2, mlp_dim=16 * heads, image_size=(4 * p, 3 * p),
                   representation_size=8 if config.representation_size else None)
        if config.window_size:  # windows of 2 on the 4x3 grid (one padded column), block 2 global if any is
            out.update(window_size=2, global_blocks=(1,) if config.global_blocks else ())
        return out


_IN = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)
_REG4_GAP = dict(class_token=False, pool="mean", reg_tokens=4)

register_family(
    "vit",
    VisionTransformer,
    ViTConfig,
    {
        "vit_tiny_patch16_224": (dict(dim=192, depth=12, heads=3, mlp_dim=768),
                                 pretrained_cfg(hub_id="timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", **_IN)),
        "vit_small_patch16_224": (dict(dim=384, depth=12, heads=6, mlp_dim=1536),
                                  pretrained_cfg(hub_id="timm/vit_small_patch16_224.augreg_in21k_ft_in1k", **_IN)),
        "vit_base_patch16_224": (dict(dim=768, depth=12, heads=12, mlp_dim=3072),
                                 pretrained_cfg(hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", **_IN)),
        "vit_base_patch32_224": (dict(patch_size=32, dim=768, depth=12, heads=12, mlp_dim=3072),
                                 pretrained_cfg(hub_id="timm/vit_base_patch32_224.augreg_in21k_ft_in1k", **_IN)),
        "vit_base_patch16_384": (dict(image_size=384, dim=768, depth=12, heads=12, mlp_dim=3072),
                                 pretrained_cfg(input_size=384, crop_pct=1.0,
                                                hub_id="timm/vit_base_patch16_384.augreg_in21k_ft_in1k", **_IN)),
        "vit_large_patch16_224": (dict(dim=1024, depth=24, heads=16, mlp_dim=4096),
                                  pretrained_cfg(hub_id="timm/vit_large_patch16_224.augreg_in21k_ft_in1k", **_IN)),
        "vit_huge_patch14_224": (dict(patch_size=14, dim=1280, depth=32, heads=16, mlp_dim=5120),
                                 pretrained_cfg(**_IN)),
        # register models (timm's *_reg4_gap_256): 4 registers, no class token, mean pooling, no_embed_class
        "vit_base_patch16_reg4_gap_256": (dict(image_size=256, dim=768, depth=12, heads=12, mlp_dim=3072, **_REG4_GAP),
                                          pretrained_cfg(input_size=256, **_IN)),
        "vit_medium_patch16_reg4_gap_256": (
            dict(image_size=256, dim=512, depth=12, heads=8, mlp_dim=2048, layer_scale=1e-5, **_REG4_GAP),
            pretrained_cfg(input_size=256, crop_pct=0.95,
                           hub_id="timm/vit_medium_patch16_reg4_gap_256.sbb_in12k_ft_in1k", **_IN)),
        "vit_betwixt_patch16_reg4_gap_256": (
            dict(image_size=256, dim=640, depth=12, heads=10, mlp_dim=2560, layer_scale=1e-5, **_REG4_GAP),
            pretrained_cfg(input_size=256, crop_pct=0.95,
                           hub_id="timm/vit_betwixt_patch16_reg4_gap_256.sbb2_e200_in12k_ft_in1k", **_IN)),
    },
)
