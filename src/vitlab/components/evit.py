"""Attentive token keeping (EViT; Liang et al., 2022, "Not All Patches are What You Need").

At a few chosen blocks, between the attention and the MLP, only the patch tokens the class
token attends to most are kept, so every later block works on fewer tokens:

* **Ranking**: the class token's attention probabilities on the patch tokens of that block,
  mean over heads (``metric="cls"``). The fused SDPA path returns no probabilities, so the
  class query row is computed again against the keys (kept by the attention's
  ``keep_queries`` / ``keep_keys`` hooks; one row, not the N x N matrix). An attention with its
  own ``forward`` (CaiT's talking heads) records its probabilities through a private capture
  instead. Models with no class token in their blocks (CaiT's self-attention stage, mean-pooled
  ViTs) can rank by the mean attention each patch receives over all queries (``metric="mean"``).
* **Keeping**: the top ``ceil(keep_rate * N_patches)`` patch tokens stay, in their original
  order; prefix tokens (class, distillation, registers; counted from ``token_layout``) always
  stay first. In a later chosen block the "patch tokens" are all non-prefix tokens, the fused
  token of an earlier block included (as in the paper).
* **Fusing** (``fuse=True``): the dropped tokens become one token, their mean weighted by the
  same attention scores, appended after the kept tokens. The authors' code sums the
  weighted tokens without dividing by the weights' sum; this module takes the weighted mean.

The patch is applied from outside, like :mod:`vitlab.components.tome`: :func:`apply_evit`
replaces the ``forward`` of every shared :class:`~vitlab.components.layers.Block` (the chosen
ones prune; the others only drop the token grid once it no longer holds) and
:func:`remove_evit` restores them. With ``keep_rate=1`` the patched model computes exactly
what the plain model does.

Example:
    >>> with evit(model, keep_rate=0.7) as state:
    ...     logits = model(images)
    >>> state.tokens  # tokens after each block
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from .attention import Attention, AttentionCapture, WindowAttention
from .layers import Block

Metric = Literal["cls", "mean"]


def default_locations(depth: int) -> list[int]:
    """EViT's pruning blocks: the ones at 1/4, 2/4 and 3/4 of the depth (3, 6, 9 for 12 blocks), 0-based."""
    return sorted({k * depth // 4 for k in (1, 2, 3)})


def kept_count(keep_rate: float, n: int) -> int:
    """``ceil(keep_rate * n)`` tokens kept out of ``n`` (a 1e-9 tolerance, so 0.7 * 10 keeps 7, not 8)."""
    return min(n, max(0, math.ceil(keep_rate * n - 1e-9)))


def keep_tokens(x: Tensor, scores: Tensor, keep: int, prefix: int, fuse: bool = True) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` best-scored non-prefix tokens of ``x`` in their order; fuse the rest.

    Args:
        x: (B, P + N, C) tokens, the ``prefix`` P first.
        scores: (B, N) importance of each non-prefix token (non-negative attention weights).
        keep: Tokens to keep, 1 <= keep <= N.
        prefix: Leading tokens always kept.
        fuse: Append one token, the ``scores``-weighted mean of the dropped tokens (when any).

    Returns:
        Tokens (B, P + keep [+ 1], C) and the kept indices (B, keep) into the N non-prefix tokens,
        ascending.
    """
    b, n_all, c = x.shape
    n = n_all - prefix
    if scores.shape != (b, n):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {n} non-prefix tokens of x {tuple(x.shape)}: "
                         f"expected ({b}, {n})")
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    rest = x[:, prefix:]
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, N): best first, ties by index
    kept = order[:, :keep].sort(dim=1).values  # (B, keep), original order
    out = [x[:, :prefix], rest.gather(1, kept[..., None].expand(b, keep, c))]
    if fuse and keep < n:
        dropped = order[:, keep:]  # (B, N - keep)
        w = scores.gather(1, dropped)[..., None].to(x.dtype)  # (B, N - keep, 1)
        tokens = rest.gather(1, dropped[..., None].expand(b, n - keep, c))  # (B, N - keep, C)
        denom = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        out.append((w * tokens).sum(dim=1, keepdim=True) / denom)  # (B, 1, C)
    return torch.cat(out, dim=1), kept


def attention_scores(attn: Attention, x: Tensor, prefix: int, metric: Metric = "cls",
                     **kwargs) -> tuple[Tensor, Tensor]:
    """Run ``attn`` on normed tokens ``x`` (B, P + N, C); return its output and the (B, N) patch scores.

    ``metric="cls"``: the class token's (token 0) attention probabilities on the N non-prefix
    tokens, mean over heads; ``"mean"``: the mean over all queries and heads of the attention
    each non-prefix token receives.
    """
    if type(attn).forward is Attention.forward:  # plain self-attention: SDPA runs, the probabilities are recomputed
        old = attn.keep_queries, attn.keep_keys
        attn.keep_queries = attn.keep_keys = True
        try:
            out = attn(x, **kwargs)
            q, k = attn.last_queries, attn.last_keys
        finally:
            (attn.keep_queries, attn.keep_keys), attn.last_queries, attn.last_keys = old, None, None
        if metric == "cls":
            q = q[:, :, :1]  # (B, heads, 1, d): the class query row only
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, Nq, N_all)
        bias = kwargs.get("attn_bias")  # relative positions are refused by apply_evit
        if bias is not None:
            bias = bias.expand(*bias.shape[:-2], x.shape[1], bias.shape[-1])  # broadcast rows to (.., N_all, N_all)
            logits = logits + (bias[..., :1, :] if metric == "cls" else bias)
        probs = logits.softmax(dim=-1)
    else:  # an attention with its own forward (talking heads): read its recorded probabilities
        own = attn._capture is None
        if own:
            attn._capture, attn._capture_name = AttentionCapture(detach=False), "evit"
        cap = attn._capture
        try:
            before = len(cap.records)
            out = attn(x, **kwargs)
            if len(cap.records) == before:
                raise ValueError(f"{type(attn).__name__} recorded no attention probabilities, so EViT cannot rank "
                                 "its tokens: its forward must go through AttentionBase.attend")
            probs = cap.records[-1].probs  # (B, heads, N_all, N_all)
        finally:
            if own:
                cap.clear()
                attn._capture, attn._capture_name = None, ""
        if metric == "cls":
            probs = probs[:, :, :1]
    if metric == "cls":
        return out, probs[:, :, 0, prefix:].mean(dim=1)  # (B, heads, N_all) -> (B, N)
    return out, probs[..., prefix:].mean(dim=(1, 2))  # (B, heads, N_all, N) -> (B, N)


@dataclass
class EViTState:
    """Settings of a patched model and what its last forward left.

    Attributes:
        keep_rate: Fraction of the non-prefix tokens kept at each pruning block (one per location).
        locations: Indices (among the model's ``Block`` modules, call order) of the pruning blocks.
        fuse: Dropped tokens fused into one extra token.
        metric: ``"cls"`` or ``"mean"`` (see :func:`attention_scores`).
        protected: Prefix tokens of each block (never dropped).
        blocks: Names of the patched blocks, in call order.
        tokens: Token count after every patched block in the last forward.
        kept: Per pruning block of the last forward, the kept indices (B, keep) into that block's
            non-prefix tokens (ascending).
        scores: Per pruning block of the last forward, the (B, N) scores the ranking used.
        pruned: Whether a block of the current forward has dropped tokens yet (the grid is gone).
    """

    keep_rate: list[float]
    locations: list[int]
    fuse: bool
    metric: Metric
    protected: list[int]
    blocks: list[str]
    tokens: list[int] = field(default_factory=list)
    kept: list[Tensor] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)
    pruned: bool = False

    def reset(self) -> None:
        self.tokens, self.kept, self.scores, self.pruned = [], [], [], False


def _evit_blocks(model: nn.Module) -> list[tuple[str, Block]]:
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no vitlab Block to apply EViT token keeping to")
    for name, blk in blocks:
        attn = blk.attn
        if not isinstance(attn, Attention) or isinstance(attn, WindowAttention) or attn.rel_pos is not None \
                or getattr(blk.mlp, "mid", None) is not None:
            raise ValueError(f"EViT token keeping needs global self-attention on a token sequence in every block; "
                             f"{name} has {type(attn).__name__} (window attention, relative positions or a "
                             "grid-dependent MLP need the token grid, which dropping tokens destroys)")
    return blocks


def _prefix_segments(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Kinds (``cls``, ``dist``, ``reg``...) of the leading prefix segments of each block's queries."""
    layout_fn = getattr(model, "token_layout", None)
    config = getattr(model, "config", None)
    if layout_fn is None or config is None:
        raise ValueError(f"{type(model).__name__} has no token_layout, so its prefix tokens (class, distillation, "
                         "registers) are unknown: EViT needs a vitlab backbone")
    layout = {a.module: a for a in layout_fn(tuple(config.image_size)).attention}
    out = []
    for name in names:
        entry = layout.get(f"{name}.attn")
        if entry is None:
            raise ValueError(f"token_layout of {type(model).__name__} does not describe {name}.attn")
        kinds = []
        for seg in entry.queries:
            if seg.grid is not None:
                break
            kinds.append(str(seg.key[0]))
        out.append(kinds)
    return out


def _resolve_rates(keep_rate: float | Sequence[float], n: int) -> list[float]:
    rates = [keep_rate] * n if isinstance(keep_rate, (int, float)) and not isinstance(keep_rate, bool) \
        else list(keep_rate) if isinstance(keep_rate, (list, tuple)) else None
    if rates is None or len(rates) != n or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r <= 1.0 for r in rates):
        raise ValueError(f"keep_rate must be a float in (0, 1] or a list of {n} such floats (one per pruning "
                         f"block), got {keep_rate!r}")
    return [float(r) for r in rates]


def _evit_forward(blk: Block, index: int, state: EViTState) -> Callable[..., Tensor]:
    def forward(x: Tensor, **attn_kwargs) -> Tensor:
        if index == 0:
            state.reset()  # a new forward pass starts at the first block
        kwargs = dict(attn_kwargs)
        if state.pruned and "grid" in kwargs:
            kwargs["grid"] = None  # the kept tokens no longer lie on the grid
        prefix = state.protected[index]
        rate = state.keep_rate[state.locations.index(index)] if index in state.locations else 1.0
        n = x.shape[1] - prefix
        keep = max(kept_count(rate, n), 1)
        if keep >= n:  # nothing to drop: exactly the plain block
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), **kwargs)))
        else:
            out, scores = attention_scores(blk.attn, blk.norm1(x), prefix, state.metric, **kwargs)
            x = x + blk.drop_path1(blk.ls1(out))
            x, kept = keep_tokens(x, scores, keep, prefix, state.fuse)
            state.kept.append(kept)
            state.scores.append(scores)
            state.pruned = True
            if "grid" in kwargs:
                kwargs["grid"] = None
        state.tokens.append(x.shape[1])
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x), kwargs.get("grid"))))

    return forward


def apply_evit(model: nn.Module, keep_rate: float | Sequence[float], locations: Sequence[int] | None = None,
               fuse: bool = True, metric: Metric = "cls") -> nn.Module:
    """Patch every shared ``Block`` of ``model`` (in place) to keep its most attended tokens; returns ``model``.

    Args:
        model: A vitlab backbone whose blocks are :class:`~vitlab.components.layers.Block` with
            global self-attention (ViT, DeiT, CaiT's self-attention stage).
        keep_rate: Fraction in (0, 1] of the non-prefix tokens kept at each pruning block (one
            float, or one per location); 1 leaves the outputs bit-identical.
        locations: 0-based indices of the pruning blocks among the model's blocks (in call
            order); by default those at 1/4, 2/4 and 3/4 depth (3, 6, 9 of 12).
        fuse: Fuse the dropped tokens into one attention-weighted token after the kept ones.
        metric: ``"cls"`` ranks by the class token's attention (EViT); ``"mean"`` by the mean
            attention received over all queries, for blocks without a class token.

    Raises:
        ValueError: For a bad keep rate or location, blocks that need the token grid, a model
            without ``token_layout``, ``metric="cls"`` without a class token, or grad checkpointing.
    """
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("EViT does not work with activation checkpointing (a recomputed block would prune "
                         "twice): call model.set_grad_checkpointing(False) first")
    if metric not in ("cls", "mean"):
        raise ValueError(f"metric must be 'cls' (class-token attention) or 'mean' (mean attention received), "
                         f"got {metric!r}")
    if "_tome_state" in model.__dict__:
        raise ValueError("EViT and token merging both replace the blocks' forward: call remove_tome(model) first")
    remove_evit(model)
    blocks = _evit_blocks(model)
    names = [n for n, _ in blocks]
    depth = len(blocks)
    locs = default_locations(depth) if locations is None else list(locations)
    if not locs or len(set(locs)) != len(locs) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in locs):
        raise ValueError(f"locations must be distinct block indices in [0, {depth}), got {locations!r}")
    locs = sorted(locs)
    rates = _resolve_rates(keep_rate, len(locs))
    kinds = _prefix_segments(model, names)
    if metric == "cls":
        for i in locs:
            if not kinds[i] or kinds[i][0] != "cls":
                raise ValueError(f"EViT ranks tokens by the class token's attention, but {names[i]} of "
                                 f"{type(model).__name__} has no class token first in its sequence (prefix "
                                 f"{kinds[i] or 'none'}): pass metric='mean' to rank by the mean attention received")
    state = EViTState(rates, locs, fuse, metric, [len(k) for k in kinds], names)
    for i, (_, blk) in enumerate(blocks):
        blk.forward = _evit_forward(blk, i, state)  # instance attribute shadows Block.forward
    model._evit_state = state
    return model


def remove_evit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_evit` (a no-op on an unpatched model); returns ``model``."""
    state = model.__dict__.pop("_evit_state", None)
    if state is not None:
        for _, blk in _evit_blocks(model):
            blk.__dict__.pop("forward", None)
    return model


def evit_state(model: nn.Module) -> EViTState:
    """The :class:`EViTState` of a patched model (token counts and kept indices of its last forward)."""
    state = model.__dict__.get("_evit_state")
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched for EViT: call apply_evit(model, keep_rate) first")
    return state


@contextlib.contextmanager
def evit(model: nn.Module, keep_rate: float | Sequence[float], locations: Sequence[int] | None = None,
         fuse: bool = True, metric: Metric = "cls") -> Iterator[EViTState]:
    """Context manager form of :func:`apply_evit`; the model is restored on exit."""
    apply_evit(model, keep_rate, locations, fuse, metric)
    try:
        yield evit_state(model)
    finally:
        remove_evit(model)


__all__ = ["EViTState", "apply_evit", "attention_scores", "default_locations", "evit", "evit_state", "keep_tokens",
           "kept_count", "remove_evit"]
