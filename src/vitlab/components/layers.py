"""Mlp, DropPath, LayerScale and the pre-norm transformer Block.

These are the only copies of these layers in vitlab; every model family builds on them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .attention import Attention


def drop_path(x: Tensor, drop_prob: float, training: bool, scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``.

    Args:
        x: Residual branch output, any shape with the batch first.
        drop_prob: Probability of dropping a sample's branch.
        training: Identity unless True.
        scale_by_keep: Divide kept samples by ``1 - drop_prob`` so the expectation is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    # One Bernoulli draw per sample, broadcast over the other dims: (B, 1, 1, ...).
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    if scale_by_keep and keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT), initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 * x)``: the GELU approximation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(nn.Module):
    """Two-layer feed-forward network: fc1 -> act -> [mid] -> drop -> fc2 -> drop.

    Args:
        in_features: Input (and by default output) width.
        hidden_features: Hidden width (``mlp_dim``).
        out_features: Output width; defaults to ``in_features``.
        act_layer: Activation class (GELU by default).
        drop: Dropout after the activation and after fc2.
        bias: Bias in both linear layers.
        mid: Optional module applied to the hidden tokens after fc1, called as
            ``mid(x, grid)`` with the token grid (H, W); PVT v2's depth-wise convolution.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
        mid: nn.Module | None = None,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.mid = mid
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        x = self.fc1(x)
        if self.mid is not None:
            x = self.mid(x, grid)
        x = self.drop1(self.act(x))
        return self.drop2(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(LS(attn(norm(x))))`` then the same with the MLP.

    The attention and MLP modules can be passed in, so a family reuses this block with its
    paper's attention (talking heads, spatial reduction) without another copy of it.
    Extra keyword arguments of :meth:`forward` go to the attention module.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        attn: nn.Module | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn if attn is not None else Attention(
            dim, heads, qkv_bias=qkv_bias, attn_drop=attention_dropout, proj_drop=dropout
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, mlp_dim, act_layer=act_layer, drop=dropout)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, **attn_kwargs) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        grid = attn_kwargs.get("grid")
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), grid)))
        return x


def checkpoint_seq(fn: Callable[..., Tensor], x: Tensor, *args, **kwargs) -> Tensor:
    """Run ``fn(x, *args, **kwargs)`` under activation checkpointing (non-reentrant)."""
    return torch.utils.checkpoint.checkpoint(fn, x, *args, use_reentrant=False, **kwargs)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates increasing linearly from 0 to ``rate`` over all blocks, split per stage.

    ``depths`` lists the blocks per stage (one stage: ``[depth]``); block ``k`` of ``n`` in total
    gets ``rate * k / (n - 1)``.
    """
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start : start + d])
        start += d
    return out


def tokens_to_map(x: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """Tokens (B, P + h*w, C) on ``grid`` -> map (B, C, h, w), the P prefix tokens left out."""
    b, n, c = x.shape
    if n != num_prefix_tokens + grid[0] * grid[1]:
        raise ValueError(f"got {n} tokens for a {grid[0]}x{grid[1]} grid with {num_prefix_tokens} prefix token(s)")
    # (B, P + h*w, C) -> (B, h*w, C) -> (B, C, h*w) -> (B, C, h, w)
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(b, c, grid[0], grid[1])


__all__ = ["drop_path", "DropPath", "LayerScale", "Mlp", "Block", "checkpoint_seq", "drop_path_rates", "tokens_to_map"]
