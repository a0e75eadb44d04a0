"""CrossViT (Chen et al., 2021): two ViT branches at two patch sizes that talk through cross-attention.

What the paper adds to ViT:

* **Two branches.** A small-patch branch (branch 0, e.g. 12 px patches, narrow) and a
  large-patch branch (branch 1, e.g. 16 px, twice as wide), each with its own patch
  embedding, class token and learned position embedding. As in timm, branch ``b`` sees the
  image resized by ``img_scale[b]`` (bicubic): the released models take 240 px images and
  run branch 1 on a 224 px copy.
* **Multi-scale stages.** Each stage runs a stack of ordinary transformer blocks per
  branch, then fuses the branches: each branch's class token is projected to the other
  branch's width (LayerNorm -> GELU -> Linear), queries the other branch's tokens with
  cross-attention (only the class token is a query, so fusion costs O(N), not O(N^2)),
  and is projected back.
* **Two heads.** A LayerNorm and a classifier per branch on its class token; the logits
  are averaged.

The "dagger" variants replace the patch projection with a small convolutional stem
(:class:`ConvPatchEmbed`).

State-dict keys follow timm (``cls_token_0``, ``pos_embed_1``, ``patch_embed.0.proj``,
``blocks.S.blocks.B.K...``, ``blocks.S.projs.B``, ``blocks.S.revert_projs.B``, ``norm.B``,
``head.B``) except inside the fusion: vitlab stores every fusion as a list of blocks
(``blocks.S.fusion.B.J``) whose attention is vitlab's :class:`CrossAttention` (``attn.q``,
fused ``attn.kv``). :mod:`vitlab.pretrained.convert_crossvit` converts timm checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import (
    AttentionLayout, Block, CrossAttention, DropPath, FeatureLayout, PatchEmbed, Segment, TokenGrid, TokenLayout,
    LearnedPosEmbed, drop_path_rates, to_2tuple,
)
from ..config import build_config
from .base import (
    Backbone, GroupMatcher, IntermediateResult, MapTap, classifier_head, config_errors, init_linears, pretrained_cfg,
    raise_config_errors,
)
from .registry import register_family

NUM_BRANCHES = 2


def _pair(value: object, name: str, kind: type) -> tuple:
    """A scalar repeated for both branches, or a pair, converted to ``kind``."""
    if isinstance(value, (tuple, list)):
        if len(value) != NUM_BRANCHES:
            raise ValueError(f"{name} needs one value per branch (a pair), got {value!r}")
        return tuple(kind(v) for v in value)
    return (kind(value),) * NUM_BRANCHES


@dataclass(frozen=True)
class CrossViTConfig:
    """Configuration of a :class:`CrossViT`.

    Pairs hold one value per branch: branch 0 is the small-patch branch, branch 1 the
    large-patch one.

    Attributes:
        image_size: Default input size (int or (H, W)); fixes the position-embedding grids.
        img_scale: Per-branch resize factor: branch ``b`` sees the image bicubically resized
            to ``(int(H * s_b), int(W * s_b))`` (timm's rule; 240 * 224/240 -> 224).
        patch_size: Per-branch patch side in pixels.
        in_channels: Image channels.
        num_classes: Classifier outputs of each head; 0 for no heads (features only).
        dim: Per-branch token width.
        depth: One ``(blocks_branch0, blocks_branch1, fusion_blocks)`` triple per
            multi-scale stage. ``fusion_blocks`` 0 means one cross-attention block (timm's
            legacy form, used by every released model).
        heads: Per-branch attention heads; the fusion into branch ``b`` uses the heads of
            the other branch (whose width it runs at).
        mlp_ratio: MLP hidden width / token width for branch 0, branch 1 and the fusion;
            the fusion blocks have no MLP, so the third value is kept only for timm parity.
        qkv_bias: Bias in the q/k/v projections (blocks and fusion).
        multi_conv: Convolutional patch stem (the "dagger" models; patch sizes 12 and 16).
        dropout: Dropout after the position embeddings, in the MLPs and after attention.
        attention_dropout: Dropout on the attention probabilities.
        drop_path: Stochastic-depth rate at the end (linearly increasing from 0).
        head_dropout: Dropout before the classifiers.
        pool: ``"cls"`` (class token, as released) or ``"mean"`` (mean of patch tokens).
        norm_eps: LayerNorm epsilon.
        pad_input: Pad a (resized) image that is not a multiple of a branch's patch size.
    """

    image_size: int | tuple[int, int] = 240
    img_scale: tuple[float, float] = (1.0, 224 / 240)
    patch_size: tuple[int, int] = (12, 16)
    in_channels: int = 3
    num_classes: int = 1000
    dim: tuple[int, int] = (128, 256)
    depth: tuple[tuple[int, int, int], ...] = ((1, 3, 0), (1, 3, 0), (1, 3, 0))
    heads: tuple[int, int] = (4, 4)
    mlp_ratio: tuple[float, float, float] = (3.0, 3.0, 1.0)
    qkv_bias: bool = True
    multi_conv: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    head_dropout: float = 0.0
    pool: Literal["cls", "mean"] = "cls"
    norm_eps: float = 1e-6
    pad_input: bool = True

    def __post_init__(self) -> None:
        errors: list[str] = []
        setf = partial(object.__setattr__, self)
        try:
            setf("image_size", to_2tuple(self.image_size))
            setf("img_scale", _pair(self.img_scale, "img_scale", float))
            setf("patch_size", _pair(self.patch_size, "patch_size", int))
            setf("dim", _pair(self.dim, "dim", int))
            setf("heads", _pair(self.heads, "heads", int))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid CrossViTConfig: {e}") from None
        ratio = self.mlp_ratio
        if isinstance(ratio, (int, float)):
            ratio = (ratio, ratio, 1.0)
        if len(ratio) != 3:
            errors.append(f"mlp_ratio needs three values (branch 0, branch 1, fusion), got {self.mlp_ratio!r}")
        else:
            setf("mlp_ratio", tuple(float(r) for r in ratio))
        if not isinstance(self.depth, (tuple, list)) or not self.depth:
            errors.append(f"depth needs at least one (blocks_0, blocks_1, fusion) stage triple, got {self.depth!r}")
        else:
            stages = []
            for stage in self.depth:
                if not isinstance(stage, (tuple, list)) or len(stage) != 3:
                    errors.append(f"each depth stage is a (blocks_0, blocks_1, fusion) triple, got {stage!r}")
                    continue
                stage = tuple(int(v) for v in stage)
                if min(stage[:2]) < 1 or stage[2] < 0:
                    errors.append(f"a depth stage needs >= 1 block per branch and >= 0 fusion blocks, got {stage}")
                stages.append(stage)
            setf("depth", tuple(stages))
        ratios = self.mlp_ratio if isinstance(self.mlp_ratio, tuple) else ()
        errors += config_errors(
            self, positive=("patch_size", "dim", "heads", "img_scale", "in_channels"),
            rates=("dropout", "attention_dropout", "drop_path", "head_dropout"),
            checks=[
                (all(h <= 0 or d % h == 0 for d, h in zip(self.dim, self.heads)),
                 f"each dim {self.dim} must be divisible by its branch's heads {self.heads}"),
                (all(r > 0 for r in ratios), f"mlp_ratio values must be positive, got {self.mlp_ratio}"),
                (self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}"),
            ],
        )
        if self.multi_conv:
            bad = [p for p in self.patch_size if p not in ConvPatchEmbed.STEMS]
            if bad:
                errors.append(f"multi_conv stems exist for patch sizes 12 and 16 only, got patch_size {self.patch_size}")
            if min(self.dim) < 4:
                errors.append(f"multi_conv needs dim >= 4 (the stem's first conv has dim // 4 channels), got {self.dim}")
        if all(v > 0 for v in self.img_scale) and all(p > 0 for p in self.patch_size):
            for b in range(NUM_BRANCHES):
                scaled = scaled_size(self.image_size, self.img_scale[b])
                if min(scaled[0], scaled[1]) < self.patch_size[b]:
                    errors.append(
                        f"image_size {self.image_size} resized by img_scale[{b}]={self.img_scale[b]:.4g} is "
                        f"{scaled}, smaller than patch_size[{b}]={self.patch_size[b]}"
                    )
        raise_config_errors(self, errors)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The image size a branch sees: ``(int(H * scale), int(W * scale))`` (timm's rule)."""
    return int(size[0] * scale), int(size[1] * scale)


def resize_for_branch(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize (align_corners=False) of (B, C, H, W) images to ``size``; a no-op when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def consistent_reduction(image_size: tuple[int, int], grid: tuple[int, int], stride: float) -> int:
    """The integer stride ``r`` with ``ceil(H / r), ceil(W / r) == grid`` closest to ``stride``.

    A branch that sees a resized image has a fractional stride in input pixels (16 / (224 /
    240) = 17.14 for CrossViT's branch 1), so no integer describes it at every size. This
    picks the integer that is exact for the configured image size; when none is (possible
    for odd non-square sizes), ``round(stride)``.
    """
    h, w = image_size
    gh, gw = grid
    fits = [r for r in range(1, max(h, w) + 1) if -(-h // r) == gh and -(-w // r) == gw]
    if not fits:
        return max(1, round(stride))
    return min(fits, key=lambda r: (abs(r - stride), r))


class ConvPatchEmbed(PatchEmbed):
    """CrossViT-dagger's convolutional patch embedding (timm ``multi_conv``).

    :class:`PatchEmbed` with ``proj`` replaced by three convolutions with ReLU in between:
    7x7 stride 4 to ``dim // 4`` channels, then 3x3 to ``dim // 2``, then 3x3 to ``dim``,
    whose strides multiply to the patch size (4 * 3 * 1 = 12 or 4 * 2 * 2 = 16). Input
    validation, right/bottom padding to a multiple of the patch size and the token layout
    are the parent's, so the grid is ``ceil(H / patch)`` as for the plain embedding.
    """

    #: patch size -> (stride, padding) of the second and of the third convolution.
    STEMS = {12: ((3, 0), (1, 1)), 16: ((2, 1), (2, 1))}

    def __init__(self, patch_size: int = 16, in_channels: int = 3, dim: int = 768, pad_input: bool = True) -> None:
        super().__init__(patch_size, in_channels, dim, pad_input=pad_input)
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p not in self.STEMS:
            raise ValueError(f"the convolutional patch stem exists for patch sizes 12 and 16, got {self.patch_size}")
        (s2, p2), (s3, p3) = self.STEMS[p]
        self.proj = nn.Sequential(  # type: ignore[assignment]
            nn.Conv2d(in_channels, dim // 4, kernel_size=7, stride=4, padding=3),
            nn.ReLU(),
            nn.Conv2d(dim // 4, dim // 2, kernel_size=3, stride=s2, padding=p2),
            nn.ReLU(),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=s3, padding=p3),
        )


class FusionBlock(nn.Module):
    """Cross-attention fusion: the first token (a projected class token) queries all tokens.

    ``x`` is (B, 1 + N, C): the class token of one branch, projected to this width, followed
    by the other branch's patch tokens. Returns only the updated class token (B, 1, C):
    ``cls + DropPath(CrossAttention(norm(cls), norm(x)))``; there is no MLP.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CrossAttention(dim, heads, qkv_bias=qkv_bias, attn_drop=attention_dropout, proj_drop=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm1(x)
        return x[:, :1] + self.drop_path(self.attn(normed[:, :1], context=normed))


def _projection(in_dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    """LayerNorm -> GELU -> Linear, the map of a class token between branch widths."""
    return nn.Sequential(norm_layer(in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


class MultiScaleStage(nn.Module):
    """One multi-scale stage: per-branch transformer blocks, then class-token fusion.

    Args:
        dims: Per-branch widths.
        heads: Per-branch heads.
        depth: ``(blocks_branch0, blocks_branch1, fusion_blocks)``; 0 fusion blocks means 1.
        mlp_ratio: Per-branch MLP ratios (the third, fusion value is unused).
        drop_path: Rates indexed like timm's: block ``i`` of a branch gets ``drop_path[i]``,
            the fusion blocks ``drop_path[-1]``.
        norm_layer: Norm constructor.
    """

    def __init__(
        self,
        dims: tuple[int, int],
        heads: tuple[int, int],
        depth: tuple[int, int, int],
        mlp_ratio: tuple[float, ...],
        qkv_bias: bool,
        dropout: float,
        attention_dropout: float,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        drop = dict(dropout=dropout, attention_dropout=attention_dropout)
        self.blocks = nn.ModuleList(
            nn.Sequential(*[
                Block(dims[b], heads[b], int(dims[b] * mlp_ratio[b]), qkv_bias=qkv_bias, drop_path=drop_path[i],
                      norm_layer=norm_layer, **drop)
                for i in range(depth[b])
            ])
            for b in range(NUM_BRANCHES)
        )
        other = [(b + 1) % NUM_BRANCHES for b in range(NUM_BRANCHES)]
        self.projs = nn.ModuleList(_projection(dims[b], dims[o], norm_layer) for b, o in enumerate(other))
        self.fusion = nn.ModuleList(
            nn.ModuleList(
                FusionBlock(dims[o], heads[o], qkv_bias=qkv_bias, drop_path=drop_path[-1], norm_layer=norm_layer, **drop)
                for _ in range(max(depth[2], 1))
            )
            for o in other
        )
        self.revert_projs = nn.ModuleList(_projection(dims[o], dims[b], norm_layer) for b, o in enumerate(other))

    def forward(self, xs: list[Tensor], layouts: list[dict],
                run: Callable[[nn.Module, Tensor], Tensor] | None = None,
                tap: Callable[[int, Tensor], Tensor] | None = None) -> list[Tensor]:
        """Run the stage on per-branch tokens (B, 1 + N_b, C_b), class token first.

        Args:
            xs: Tokens of each branch.
            layouts: Per-branch ``capture_info`` base (branch, grid, prefix tokens, ...).
            run: How to call each block (the model's ``run_checkpointed``); a plain call by default.
            tap: ``tap(branch, tokens) -> tokens`` on each branch's output before the fusion
                (``collect_intermediates``: its patch tokens are what both branches' fusion reads).
        """
        run = run or (lambda module, x: module(x))

        outs = []
        for b, x in enumerate(xs):
            for blk in self.blocks[b]:
                blk.attn.capture_info = dict(layouts[b], kind="self")
                x = run(blk, x)
            outs.append(tap(b, x) if tap is not None else x)
        fused = []
        for b in range(NUM_BRANCHES):
            o = (b + 1) % NUM_BRANCHES
            cls = self.projs[b](outs[b][:, :1])  # (B, 1, C_b) -> (B, 1, C_o)
            t = torch.cat([cls, outs[o][:, 1:]], dim=1)  # (B, 1 + N_o, C_o)
            for j, blk in enumerate(self.fusion[b]):
                # The first fusion block's keys are branch o's tokens; later ones see only the class token.
                keys = dict(layouts[o]) if j == 0 else dict(grid=None, num_prefix_tokens=1)
                blk.attn.capture_info = dict(keys, kind="cross", branch=b, key_branch=o)
                t = run(blk, t)  # (B, 1, C_o)
            cls = self.revert_projs[b](t[:, :1])  # (B, 1, C_o) -> (B, 1, C_b)
            fused.append(torch.cat([cls, outs[b][:, 1:]], dim=1))  # (B, 1 + N_b, C_b)
        return fused


class CrossViT(Backbone):
    """CrossViT classifier/backbone following vitlab's backbone contract.

    ``forward_features`` returns one read-out token per image, (B, 1, C_0 + C_1): each
    branch's normed class token (or, with ``pool="mean"``, the mean of its normed patch
    tokens) side by side; ``forward_head`` returns the mean of the two heads' logits on their
    halves (or, with ``pre_logits`` or no heads, the token itself: (B, C_0 + C_1)). The whole
    normed token sequence of each branch comes from :meth:`forward_branches`, and every
    branch's maps from ``forward_intermediates``.

    ``forward_intermediates`` / ``feature_info`` are branch-major like timm's: for D stages,
    entries 0..D-1 are branch 0 (small patches) after each stage, entries D..2D-1 branch 1.
    Branch 1's stride in input pixels is fractional when ``img_scale[1] != 1`` (17.14 for
    the released models); ``feature_info`` then gives the integer stride that is exact for
    the configured image size (see :func:`consistent_reduction`) and the key ``branch``.

    Args:
        config: A :class:`CrossViTConfig`; keyword arguments override its fields.

    Example:
        >>> cfg = CrossViTConfig(image_size=48, dim=(16, 32), heads=(2, 2), depth=((1, 1, 0),))
        >>> CrossViT(cfg)(torch.randn(1, 3, 48, 48)).shape
        torch.Size([1, 1000])
    """

    family = "crossvit"
    config_class = CrossViTConfig
    no_weight_decay_names = tuple(f"cls_token_{b}" for b in range(NUM_BRANCHES))  # and the position embeddings

    def __init__(self, config: CrossViTConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(self.config_class, vars(config) if config is not None else {}, **overrides)
        self.config = c = config
        self.num_branches = NUM_BRANCHES
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        embed = ConvPatchEmbed if c.multi_conv else PatchEmbed
        self.patch_embed = nn.ModuleList(
            embed(c.patch_size[b], c.in_channels, c.dim[b], pad_input=c.pad_input) for b in range(NUM_BRANCHES)
        )
        self.image_sizes = [scaled_size(c.image_size, s) for s in c.img_scale]
        self.grid_sizes = [pe.grid_size(size) for pe, size in zip(self.patch_embed, self.image_sizes)]
        for b, (d, grid) in enumerate(zip(c.dim, self.grid_sizes)):
            setattr(self, f"cls_token_{b}", nn.Parameter(torch.zeros(1, 1, d)))
            setattr(self, f"pos_embed_{b}", LearnedPosEmbed(grid, d, num_prefix_tokens=1))
        self.pos_drop = nn.Dropout(c.dropout)

        # Stochastic depth: timm's rule, one rate per (deepest branch + fusion) block of each stage.
        rates = drop_path_rates(c.drop_path, [max(s[:2]) + s[2] for s in c.depth])
        self.blocks = nn.ModuleList(
            MultiScaleStage(c.dim, c.heads, stage, c.mlp_ratio, c.qkv_bias, c.dropout, c.attention_dropout, r, norm)
            for stage, r in zip(c.depth, rates)
        )
        self.norm = nn.ModuleList(norm(d) for d in c.dim)
        self.head_drop = nn.Dropout(c.head_dropout)
        self.num_features = sum(c.dim)
        self.head = self.new_classifier("head", c.num_classes)
        depth = len(self.blocks)
        self.feature_info = [
            dict(num_chs=c.dim[b], module=f"blocks.{s}", branch=b,
                 reduction=consistent_reduction(c.image_size, self.grid_sizes[b], c.patch_size[b] / c.img_scale[b]))
            for b in range(NUM_BRANCHES) for s in range(depth)
        ]
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0], crop_pct=0.875)
        self.init_weights()

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """timm's scheme: truncated normal (std 0.02) for tokens, position embeddings and linears."""
        for b in range(NUM_BRANCHES):
            nn.init.trunc_normal_(getattr(self, f"cls_token_{b}"), std=0.02)
            getattr(self, f"pos_embed_{b}").init_weights(std=0.02)
        init_linears(self)

    def new_classifier(self, name: str, num_classes: int) -> nn.ModuleList:
        """One fresh classifier per branch (Identity when ``num_classes`` is 0)."""
        return nn.ModuleList(classifier_head(d, num_classes) for d in self.config.dim)

    # ------------------------------------------------------------- features
    def _check_image(self, x: Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"expected an image batch of shape (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}"
                + (f"; build the model with in_channels={x.shape[1]} or convert the images" if x.ndim == 4 else "")
            )
        size = (x.shape[2], x.shape[3])
        for b, s in enumerate(c.img_scale):
            scaled = scaled_size(size, s)
            if min(scaled) < c.patch_size[b]:
                need = math.ceil(c.patch_size[b] / s)
                raise ValueError(
                    f"image size {size[0]}x{size[1]} is too small: branch {b} resizes it by {s:.4g} to "
                    f"{scaled[0]}x{scaled[1]}, smaller than its {c.patch_size[b]}-pixel patches (need at least {need})"
                )

    def position_embedding(self, branch: int, grid: tuple[int, int]) -> Tensor:
        """Branch ``branch``'s position embedding for a token grid, resampled (bicubic) if new."""
        return getattr(self, f"pos_embed_{branch}")(grid)

    def embed(self, x: Tensor) -> tuple[list[Tensor], list[dict]]:
        """Images (B, C, H, W) -> per-branch tokens (B, 1 + N_b, C_b) and their layouts.

        Branch ``b`` sees the image bicubically resized by ``img_scale[b]``; each layout dict
        (branch, token grid, prefix tokens, resized image size, patch size) is what the
        attention modules record as ``capture_info``.
        """
        self._check_image(x)
        size = (x.shape[2], x.shape[3])
        xs, layouts = [], []
        for b, pe in enumerate(self.patch_embed):
            image = scaled_size(size, self.config.img_scale[b])
            t, grid = pe(resize_for_branch(x, image))  # (B, N_b, C_b)
            cls = getattr(self, f"cls_token_{b}").expand(t.shape[0], -1, -1)
            t = torch.cat([cls, t], dim=1) + self.position_embedding(b, grid)  # (B, 1 + N_b, C_b)
            xs.append(self.pos_drop(t))
            layouts.append(dict(branch=b, grid=grid, num_prefix_tokens=1, image_size=image,
                                patch_size=self.config.patch_size[b]))
        return xs, layouts

    def run_stage(self, i: int, xs: list[Tensor], layouts: list[dict],
                  tap: Callable[[int, Tensor], Tensor] | None = None) -> list[Tensor]:
        """Multi-scale stage ``i`` on the per-branch tokens (blocks checkpointed when enabled)."""
        return self.blocks[i](xs, layouts, run=self.run_checkpointed, tap=tap)

    def forward_branches(self, x: Tensor) -> list[Tensor]:
        """Images -> ``[tokens_0, tokens_1]``: each branch's normed tokens (B, 1 + N_b, C_b), class token first."""
        xs, layouts = self.embed(x)
        for i in range(len(self.blocks)):
            xs = self.run_stage(i, xs, layouts)
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def pool(self, x: Tensor) -> Tensor:
        """(B, 1 + N, C) -> (B, C): the class token, or the mean of the patch tokens."""
        return x[:, 1:].mean(dim=1) if self.config.pool == "mean" else x[:, 0]

    def readout(self, branches: Sequence[Tensor]) -> Tensor:
        """Per-branch normed tokens -> the read-out token (B, 1, C_0 + C_1)."""
        return torch.cat([self.pool(t) for t in branches], dim=1).unsqueeze(1)  # (B, C_0 + C_1) -> (B, 1, C_0 + C_1)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Images -> the read-out token (B, 1, C_0 + C_1) of both branches (see the class docstring)."""
        self.reject_mask(mask)
        return self.readout(self.forward_branches(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Read-out token (B, 1, C_0 + C_1) -> mean of the two heads' logits.

        With ``pre_logits`` (or without heads) the read-out itself: (B, C_0 + C_1).
        """
        pooled = self.head_drop(x[:, 0])
        if pre_logits or self.config.num_classes == 0:
            return pooled
        parts = pooled.split(list(self.config.dim), dim=1)  # (B, C_0 + C_1) -> [(B, C_0), (B, C_1)]
        logits = torch.stack([head(p) for head, p in zip(self.head, parts)])  # (branches, B, classes)
        return logits.mean(dim=0)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Per-branch maps (B, C_b, H_b, W_b) after the chosen stages, branch-major, and the read-out.

        Feature ``b * D + s`` is branch ``b`` after stage ``s`` (D stages), as in timm and
        :attr:`feature_info`: all of branch 0 (small patches) first, then branch 1. ``norm``
        applies the branch's final norm to each returned map's tokens.
        """
        depth = len(self.blocks)
        last = max(k % depth for k in take) if stop_early else depth - 1
        xs, layouts = self.embed(x)
        tap = MapTap(take, (lambda k: self.norm[k // depth]) if norm else None)
        for s in range(last + 1):
            # each branch's map is taken before the fusion, whose cross-attention reads its patch tokens
            xs = self.run_stage(s, xs, layouts, tap=lambda b, t, s=s: tap(b * depth + s, t, layouts[b]["grid"], 1))
        final = None if stop_early else self.readout([n(t) for n, t in zip(self.norm, xs)])
        return final, tap.result()

    # ------------------------------------------------------------- contract
    def group_matcher(self) -> GroupMatcher:
        """Stem: tokens and embeddings of both branches; one group per multi-scale stage."""
        return dict(stem=r"^(patch_embed|cls_token_|pos_embed_)", blocks=[(r"^blocks\.(\d+)", None)])

    def branch_grid(self, branch: int, image_size: tuple[int, int]) -> TokenGrid:
        """Branch ``branch``'s token grid in input pixels (it sees the image resized by ``img_scale``)."""
        rh, rw = scaled_size(tuple(image_size), self.config.img_scale[branch])
        p = self.config.patch_size[branch]
        return TokenGrid(self.patch_embed[branch].grid_size((rh, rw)), (p * image_size[0] / rh, p * image_size[1] / rw))

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Per stage: each branch's self-attention over [cls, grid], then each branch's class token
        querying the other branch's tokens (the first fusion block; later ones see only the class token)."""
        grids = [self.branch_grid(b, image_size) for b in range(NUM_BRANCHES)]
        segs = [(Segment(("cls", b)), Segment(("grid", b), grids[b])) for b in range(NUM_BRANCHES)]
        attention, features = [], []
        for s, stage in enumerate(self.blocks):
            for b in range(NUM_BRANCHES):
                for k in range(len(stage.blocks[b])):
                    attention.append(AttentionLayout(f"blocks.{s}.blocks.{b}.{k}.attn",
                                                     f"stage {s + 1} branch {b} block {k + 1}", "self", segs[b], segs[b]))
            for b in range(NUM_BRANCHES):
                o = (b + 1) % NUM_BRANCHES
                attention.append(AttentionLayout(
                    f"blocks.{s}.fusion.{b}.0.attn", f"stage {s + 1} fusion: branch {b} class token -> branch {o} tokens",
                    "cross", (Segment(("cls", b)),), (Segment(("cls", b)), segs[o][1])))
        for b in range(NUM_BRANCHES):
            for s, stage in enumerate(self.blocks):
                features.append(FeatureLayout(f"branch {b} stage {s + 1}", grids[b],
                                              f"blocks.{s}.blocks.{b}.{len(stage.blocks[b]) - 1}", 1, stream=b))
        kind = "grid" if self.config.pool == "mean" else "cls"
        return TokenLayout(tuple(attention), tuple(features), readout=tuple((kind, b) for b in range(NUM_BRANCHES)),
                           default_queries=("cls",))

    @classmethod
    def tiny_overrides(cls, config: CrossViTConfig) -> dict:
        """Same patch sizes, image scales, stem and MLP ratios; 2 stages of 1 + 1 blocks, a small image.

        The image is 10 x 8 small patches (120 x 96 for patch 12), so branch 1 runs on a
        resized, padded image as the real models do.
        """
        p = config.patch_size[0]
        return dict(
            image_size=(10 * p, 8 * p), dim=(16, 32), heads=(2, 2),
            depth=tuple((1, 1, min(stage[2], 1)) for stage in config.depth[:2]),
        )


def _variant(dim: tuple[int, int], blocks: int, heads: int, mlp: float, **extra) -> dict:
    return dict(dim=dim, depth=((1, blocks, 0),) * 3, heads=(heads, heads), mlp_ratio=(mlp, mlp, 1.0), **extra)


_VARIANTS = {
    "crossvit_tiny_240": _variant((96, 192), 4, 3, 4.0),
    "crossvit_small_240": _variant((192, 384), 4, 6, 4.0),
    "crossvit_base_240": _variant((384, 768), 4, 12, 4.0),
    "crossvit_9_240": _variant((128, 256), 3, 4, 3.0),
    "crossvit_15_240": _variant((192, 384), 5, 6, 3.0),
    "crossvit_18_240": _variant((224, 448), 6, 7, 3.0),
    "crossvit_9_dagger_240": _variant((128, 256), 3, 4, 3.0, multi_conv=True),
}

register_family(
    "crossvit",
    CrossViT,
    CrossViTConfig,
    {
        name: (values, pretrained_cfg(input_size=240, crop_pct=0.875, hub_id=f"timm/{name}.in1k"))
        for name, values in _VARIANTS.items()
    },
)
