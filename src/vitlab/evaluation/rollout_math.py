"""The algebra of attention rollout (Abnar & Zuidema, 2020), whatever the token layout.

* :func:`fuse_heads` and :func:`discard_lowest`: head fusion (mean / max / min) and the
  discard of the lowest attentions (as in jacobgil/vit-explain).
* :func:`attention_rollout`: the product of residual-added, row-renormalised layers over one
  token set.
* :func:`rollout_layers`: the same through a model's :class:`~vitlab.evaluation.layouts.AttentionLayer`
  records (stages, reduced keys, branches), read out at chosen tokens.

Pure tensor functions: :mod:`vitlab.evaluation.interpretation` runs them on a model
(:func:`~vitlab.evaluation.interpretation.rollout`,
:func:`~vitlab.evaluation.interpretation.gradient_rollout`) and re-exports them.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from .layouts import AttentionLayer, Segment, SegmentKey, TokenGrid, overlap_matrix

__all__ = ["HeadFusion", "attention_rollout", "discard_lowest", "fuse_heads", "rollout_layers"]

HeadFusion = Literal["mean", "max", "min"]


def fuse_heads(attention: Tensor, head_fusion: HeadFusion = "mean") -> Tensor:
    """(B, heads, Nq, Nk) -> (B, Nq, Nk) by mean, max or min over heads; (B, Nq, Nk) passes through."""
    if attention.ndim == 3:
        return attention
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def discard_lowest(attention: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` of the entries of each (Nq, Nk) matrix of a (B, Nq, Nk) batch."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    flat = attention.flatten(1)  # (B, Nq * Nk)
    k = int(flat.shape[1] * ratio)
    if k == 0:
        return attention
    idx = flat.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, idx, 0.0).view_as(attention)


def _rollout_step(a: Tensor, rows_keys: Tensor, rows_queries: Tensor) -> Tensor:
    """One layer of rollout: ``normalise_rows(0.5 * A + 0.5 * I)`` applied to the running product.

    a: (B, Nq, Nk) fused attention; rows_keys: (B, Nk, C) and rows_queries: (B, Nq, C) the
    running product's rows of the keys and of the queries (the identity's residual path).
    """
    norm = 0.5 * a.sum(dim=-1, keepdim=True) + 0.5  # row sums of 0.5 * A + 0.5 * I
    return (0.5 * (a @ rows_keys) + 0.5 * rows_queries) / norm


def attention_rollout(
    attentions: Sequence[Tensor], head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> Tensor:
    """Attention rollout of a stack of self-attention layers over one token set.

    ``R = A'_L @ ... @ A'_1`` with ``A'_l = normalise_rows(0.5 * fuse(A_l) + 0.5 * I)``, where
    ``fuse`` is the head fusion and the lowest ``discard_ratio`` of each fused matrix is
    zeroed first (Abnar & Zuidema, 2020; the discard as in jacobgil/vit-explain).

    Args:
        attentions: Per layer, (B, heads, N, N) probabilities or already fused (B, N, N).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: Fraction of each fused matrix's entries set to zero.

    Returns:
        (B, N, N): row i is token i's attribution over the input tokens.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one attention matrix")
    first = attentions[0]
    b, n = first.shape[0], first.shape[-1]
    rows = torch.eye(n, device=first.device, dtype=torch.float32).expand(b, n, n)
    for a in attentions:
        if a.shape[-2:] != (n, n):
            raise ValueError(f"every layer must attend over the same {n} tokens, got {tuple(a.shape)}")
        a = discard_lowest(fuse_heads(a.float(), head_fusion), discard_ratio)
        rows = _rollout_step(a, rows, rows)
    return rows


class _RolloutState:
    """Running rollout rows of every token segment, with columns for every input-level token."""

    def __init__(self, layers: Sequence[AttentionLayer]) -> None:
        self.columns: dict[SegmentKey, tuple[int, Segment]] = {}
        width = 0
        for layer in layers:
            for seg in (*layer.queries, *layer.keys):
                if seg.key not in self.columns:
                    self.columns[seg.key] = (width, seg)
                    width += seg.size
        self.width = width
        self.rows: dict[SegmentKey, Tensor] = {}
        self.grids: dict[SegmentKey, TokenGrid | None] = {}

    def get(self, seg: Segment, batch: int, device: torch.device, store: bool) -> Tensor:
        """Rows (B, n, width) of a segment; a grid that differs from the current one is carried over by area."""
        if seg.key not in self.rows:
            start, first = self.columns[seg.key]
            eye = torch.zeros(batch, first.size, self.width, device=device)
            eye[:, torch.arange(first.size), start + torch.arange(first.size)] = 1.0
            self.rows[seg.key], self.grids[seg.key] = eye, first.grid
        rows, grid = self.rows[seg.key], self.grids[seg.key]
        if seg.grid is not None and grid is not None and seg.grid != grid:
            rows = overlap_matrix(seg.grid, grid).to(device) @ rows  # (n_new, n_old) @ (B, n_old, width)
            if store:
                self.rows[seg.key], self.grids[seg.key] = rows, seg.grid
        return rows


def rollout_layers(
    layers: Sequence[AttentionLayer],
    readout: Sequence[SegmentKey],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> dict[SegmentKey, tuple[TokenGrid, Tensor]]:
    """Rollout through a model's layers, whatever its token layout, read out at ``readout``.

    Each layer's query rows become ``normalise(0.5 * A @ rows(keys) + 0.5 * rows(queries))``;
    a grid that changes (Swin patch merging, PVT stages, reduced keys, another branch) is
    carried over by the area its tokens share with the previous grid; a prefix token that
    appears later (CaiT's class token) starts as itself. With token merging the layers' attention
    is already spread back on the patches, which accounts for the merges between blocks too
    (see :mod:`vitlab.components.tome_explain`).

    Returns:
        For every input-level grid segment: its grid and the read-out attribution (B, h, w).
    """
    if not layers:
        raise ValueError("rollout needs at least one attention layer")
    state = _RolloutState(layers)
    b, device = layers[0].batch, layers[0].source.device
    for layer in layers:
        a = discard_lowest(fuse_heads(layer.probs.float(), head_fusion), discard_ratio)
        rq = torch.cat([state.get(s, b, device, store=True) for s in layer.queries], dim=1)
        rk = torch.cat([state.get(s, b, device, store=False) for s in layer.keys], dim=1)
        new = _rollout_step(a, rk, rq)
        start = 0
        for s in layer.queries:
            state.rows[s.key] = new[:, start : start + s.size]
            start += s.size
    read = [state.rows[k].mean(dim=1) for k in readout if k in state.rows]
    if not read:
        raise ValueError(f"none of the read-out tokens {list(readout)} appear in the attention layers")
    row = torch.stack(read).mean(dim=0)  # (B, width)
    out = {}
    for key, (start, seg) in state.columns.items():
        if seg.is_grid:
            # (B, h*w) -> (B, h, w)
            out[key] = (seg.grid, row[:, start : start + seg.size].reshape(b, *seg.grid.shape))
    return out
