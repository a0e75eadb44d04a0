"""Token merging (ToMe; Bolya et al., 2023, "Token Merging: Your ViT but Faster").

Between the attention and the MLP of each patched block, ``r`` pairs of similar tokens are
merged, so every later block works on fewer tokens:

* **Bipartite soft matching**: the non-prefix tokens are split alternately into sets A and B
  (by their index in the whole sequence, as the reference implementation does); every A token
  is linked to its most similar B token by cosine similarity of the attention keys (mean over
  heads); the ``r`` most similar links are merged (A token into its B token), the other A
  tokens are kept.
* **Size-weighted average**: each token carries its size (how many patches it stands for); a
  merged token is the size-weighted mean of its parts and its size their sum.
* **Proportional attention**: ``log(size)`` is added to the attention logits of every key (the
  ``attn_bias`` path of :class:`~vitlab.components.attention.Attention`), so a merged token
  counts as many times as the tokens it replaced.
* **Protected prefix tokens**: class / distillation / register tokens are never merged and
  stay first, in order (the heads read them by index).
* **Source tracking** (``trace_source=True``): a (B, N_now, N_orig) 0/1 matrix whose row ``i``
  marks the original tokens (prefix tokens included) merged into token ``i``; kept after every
  patched block (``ToMeState.sources``), which is what maps merged tokens back to patches
  (:mod:`vitlab.components.tome_explain`, used by the explainability tools).

The patch is applied from outside: :func:`apply_tome` replaces the ``forward`` of every
shared :class:`~vitlab.components.layers.Block` of a model (its self-attention stage) and
:func:`remove_tome` restores them. Modules that read the merged tokens after that stage and
declare ``reads_merged_tokens = True`` (CaiT's class-attention blocks, whose ``forward`` takes
``size``) get the token sizes, for proportional attention on their keys. The number of prefix
tokens each block protects comes from the backbone contract's ``token_layout``. With ``r = 0``
in every block the patched model computes exactly what the plain model does (no merge, no bias).

``forward_intermediates`` of a patched model returns full patch grids: while it runs every
patched block takes and returns one token per original token (each patch holding the features
of the merged token it belongs to) and merges internally, so the maps are on the forward path
(Grad-CAM) and the final features are bit-identical to ``forward_features`` (merged tokens).

Example:
    >>> with tome(model, r=13):
    ...     logits = model(images)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import Tensor, nn

from .attention import Attention, WindowAttention
from .layers import Block

#: ``r`` per block: one int for every block, a list (one int per block), or ToMe's
#: ``(r, inflection)`` schedule (linear from ``r * (1 - inflection)`` to ``r * (1 + inflection)``).
Schedule = Union[int, Sequence[int], tuple[int, float]]
MergeFn = Callable[..., Tensor]


def parse_r(r: Schedule, num_blocks: int) -> list[int]:
    """Resolve a merge schedule into one non-negative ``r`` per block.

    Args:
        r: An int (the same ``r`` in every block), a list/tuple of ints with one entry per
            block, or a tuple ``(r, inflection)`` with a float inflection: ToMe's schedule,
            linear from ``r * (1 - inflection)`` in the first block to ``r * (1 + inflection)``
            in the last, truncated to ints (inflection -0.5: decreasing, 0: constant).
        num_blocks: Number of patched blocks.

    Returns:
        ``num_blocks`` ints (each block merges at most that many pairs; fewer when it runs
        out of tokens).
    """
    if isinstance(r, bool):
        raise ValueError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")
    if isinstance(r, int):
        out = [r] * num_blocks
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], float):
        base, inflect = r
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(num_blocks - 1, 1)
        out = [int(lo + step * i) for i in range(num_blocks)]
    elif isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        if len(r) != num_blocks:
            raise ValueError(f"a per-block r schedule needs {num_blocks} entries (one per block), got {len(r)}")
        out = list(r)
    else:
        raise ValueError(f"r must be an int, a list of {num_blocks} ints or (r, inflection) with a float "
                         f"inflection, got {r!r}")
    if any(v < 0 for v in out):
        raise ValueError(f"r must be >= 0 in every block, got {out}")
    return out


def _identity(x: Tensor, mode: str = "sum") -> Tensor:
    return x


def bipartite_soft_matching(metric: Tensor, r: int, protected: int = 0) -> MergeFn:
    """Plan the merge of ``r`` token pairs from a similarity metric (the keys, mean over heads).

    Args:
        metric: (B, N, d) per-token features compared by cosine similarity.
        r: Pairs to merge; clamped to ``(N - protected) // 2``.
        protected: Leading tokens (class, distillation, registers) that are never merged.

    Returns:
        ``merge(x, mode="sum")`` mapping (B, N, C) tokens to (B, N - r, C): the protected tokens
        first, then the kept A tokens in their order, then the B tokens, each B token reduced
        (``mode``: ``"sum"``, ``"mean"``, ``"amax"`` of ``Tensor.scatter_reduce``) with the A
        tokens merged into it.
    """
    b, n, _ = metric.shape
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return _identity
    start = protected % 2  # A = even index in the whole sequence, as in the reference implementation
    with torch.no_grad():
        m = metric[:, protected:]
        m = m / m.norm(dim=-1, keepdim=True)
        a, bset = m[:, start::2], m[:, 1 - start::2]  # (B, Na, d), (B, Nb, d)
        scores = a @ bset.transpose(-1, -2)  # (B, Na, Nb)
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B token
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # kept A tokens, in sequence order
        src_idx = edge_idx[:, :r]  # the r most similar A tokens
        dst_idx = node_idx[..., None].gather(1, src_idx)  # (B, r, 1): their B tokens
    na = a.shape[1]

    def merge(x: Tensor, mode: str = "sum") -> Tensor:
        c = x.shape[-1]
        pre, rest = x[:, :protected], x[:, protected:]
        xa, xb = rest[:, start::2], rest[:, 1 - start::2]
        unm = xa.gather(1, unm_idx.expand(b, na - r, c))
        src = xa.gather(1, src_idx.expand(b, r, c))
        dst = xb.scatter_reduce(1, dst_idx.expand(b, r, c), src, reduce=mode)
        return torch.cat([pre, unm, dst], dim=1)  # (B, N - r, C)

    return merge


def merge_wavg(merge: MergeFn, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: (B, N, C) tokens and (B, N, 1) sizes -> merged tokens and sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Update the (B, N, N_orig) source matrix (identity before the first merge) with ``merge``."""
    if source is None:
        b, n, _ = x.shape
        source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
    return merge(source, mode="amax")


def unmerge_tokens(values: Tensor, source: Tensor) -> Tensor:
    """Give every original token the value of the merged token it went into.

    Args:
        values: (B, N_now, C) per merged token (a map of (B, N_now) needs ``[..., None]``).
        source: (B, N_now, N_orig) from :func:`tome_state` after a ``trace_source`` forward.

    Returns:
        (B, N_orig, C), prefix tokens first, then the patch tokens in raster order.
    """
    if values.shape[:2] != source.shape[:2]:
        raise ValueError(f"values {tuple(values.shape)} do not match the source {tuple(source.shape)}: "
                         "expected (B, N_now, C) for a (B, N_now, N_orig) source")
    return source.transpose(1, 2).to(values.dtype) @ values  # (B, N_orig, N_now) @ (B, N_now, C)


def token_groups(source: Tensor) -> tuple[Tensor, Tensor]:
    """Index form of a source matrix (B, N_now, N_orig): ``(group, first)``.

    ``group`` (B, N_orig): the merged token each original token went into; ``first`` (B, N_now):
    the first original token of each merged token.
    """
    return source.argmax(dim=1), source.argmax(dim=2)


class _Regroup(torch.autograd.Function):
    """Full tokens whose groups hold copies -> merged tokens; see :func:`regroup_tokens`."""

    @staticmethod
    def forward(ctx, full: Tensor, group: Tensor, first: Tensor, size: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(group, size)
        return full.gather(1, first[..., None].expand(-1, -1, full.shape[-1]))  # (B, N_now, C)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        group, size = ctx.saved_tensors
        per_patch = (grad / size.to(grad.dtype)).gather(1, group[..., None].expand(-1, -1, grad.shape[-1]))
        return per_patch, None, None, None  # every patch of a merged token: 1/size of its gradient


def expand_tokens(values: Tensor, source: Tensor) -> Tensor:
    """:func:`unmerge_tokens` by indexing (exact copies): (B, N_now, C) -> (B, N_orig, C)."""
    group = source.argmax(dim=1)  # (B, N_orig)
    return values.gather(1, group[..., None].expand(-1, -1, values.shape[-1]))


def regroup_tokens(full: Tensor, source: Tensor) -> Tensor:
    """Inverse of :func:`expand_tokens`: (B, N_orig, C) tokens, equal within each merged group -> (B, N_now, C).

    The value is each group's first token (exact); the gradient is that of the group mean, so
    every patch of a merged token of size s gets 1/s of the merged token's gradient.
    """
    if full.shape[:2] != (source.shape[0], source.shape[2]):
        raise ValueError(f"tokens {tuple(full.shape)} do not match the source {tuple(source.shape)}: "
                         "expected (B, N_orig, C) for a (B, N_now, N_orig) source")
    group, first = token_groups(source)
    return _Regroup.apply(full, group, first, source.sum(dim=2, keepdim=True))


@dataclass
class ToMeState:
    """Settings of a patched model and what its last forward left.

    Attributes:
        r: Pairs to merge in each patched block (before clamping to the tokens left).
        protected: Leading tokens each block never merges.
        prop_attn: Proportional attention on.
        trace_source: Source tracking on.
        blocks: Names of the patched blocks, in call order.
        size: (B, N, 1) token sizes after the last block (None when nothing was merged).
        source: (B, N, N_orig) source matrix (None unless ``trace_source`` and a merge happened).
        sources: With ``trace_source``: the source matrix after each patched block of the last
            forward, one entry per block (None for a block before the first merge: the identity).
            Block ``i``'s attention runs on the tokens of ``sources[i - 1]``.
        tokens: Token count after the merge of each block in the last forward.
        full_tokens: Set while ``forward_intermediates`` runs: blocks take and return one token
            per original token (see the module docstring).
    """

    r: list[int]
    protected: list[int]
    prop_attn: bool
    trace_source: bool
    blocks: list[str]
    size: Tensor | None = None
    source: Tensor | None = None
    sources: list[Tensor | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    full_tokens: bool = False

    def reset(self) -> None:
        self.size, self.source, self.sources, self.tokens = None, None, [], []

    def merged(self, tokens: Tensor) -> Tensor:
        """Tokens as the next module should see them: full tokens (B, N_orig, C) regrouped to the merged ones."""
        src = self.source
        if self.full_tokens and src is not None and tokens.shape[1] == src.shape[2]:
            return regroup_tokens(tokens, src)
        return tokens


def _tome_blocks(model: nn.Module) -> list[tuple[str, Block]]:
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no vitlab Block to apply token merging to")
    for name, blk in blocks:
        attn = blk.attn
        if not isinstance(attn, Attention) or isinstance(attn, WindowAttention) or attn.rel_pos is not None \
                or getattr(blk.mlp, "mid", None) is not None:
            raise ValueError(f"token merging needs global self-attention on a token sequence in every block; "
                             f"{name} has {type(attn).__name__} (window attention, relative positions or a "
                             "grid-dependent MLP need the token grid, which merging destroys)")
    return blocks


def _protected_tokens(model: nn.Module, names: list[str]) -> list[int]:
    """Leading prefix segments (no grid) of each block's attention queries, from ``token_layout``."""
    layout_fn = getattr(model, "token_layout", None)
    config = getattr(model, "config", None)
    if layout_fn is None or config is None:
        raise ValueError(f"{type(model).__name__} has no token_layout: pass protected=<number of prefix tokens>")
    layout = {a.module: a for a in layout_fn(tuple(config.image_size)).attention}
    out = []
    for name in names:
        entry = layout.get(f"{name}.attn")
        if entry is None:
            raise ValueError(f"token_layout of {type(model).__name__} does not describe {name}.attn: "
                             "pass protected=<number of prefix tokens>")
        count = 0
        for seg in entry.queries:
            if seg.grid is not None:
                break
            count += 1
        out.append(count)
    return out


def _tome_forward(blk: Block, index: int, state: ToMeState) -> Callable[..., Tensor]:
    def forward(x: Tensor, **attn_kwargs) -> Tensor:
        if index == 0:
            state.reset()  # a new forward pass starts at the first patched block
        r, kwargs = state.r[index], dict(attn_kwargs)
        x = state.merged(x)
        if state.size is not None:
            if "grid" in kwargs:
                kwargs["grid"] = None  # merged tokens no longer lie on the grid
            if state.prop_attn:
                bias = state.size.log()[:, None, None, :, 0].to(x.dtype)  # (B, N, 1) -> (B, 1, 1, N) per key
                old = kwargs.get("attn_bias")
                kwargs["attn_bias"] = bias if old is None else old + bias
        attn = blk.attn
        attn.keep_keys = r > 0
        try:
            x = x + blk.drop_path1(blk.ls1(attn(blk.norm1(x), **kwargs)))
            keys = attn.last_keys
        finally:
            attn.keep_keys, attn.last_keys = False, None
        if r > 0:
            merge = bipartite_soft_matching(keys.mean(dim=1), r, state.protected[index])  # (B, heads, N, d) -> (B, N, d)
            if state.trace_source or state.full_tokens:
                state.source = merge_source(merge, x, state.source)
            x, state.size = merge_wavg(merge, x, state.size)
        if state.trace_source or state.full_tokens:
            state.sources.append(state.source)
        state.tokens.append(x.shape[1])
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x), kwargs.get("grid"))))
        if state.full_tokens and state.source is not None:
            x = expand_tokens(x, state.source)  # (B, N_now, C) -> (B, N_orig, C)
        return x

    return forward


def _reader_forward(mod: nn.Module, state: ToMeState) -> Callable[..., Tensor]:
    """``forward`` of a ``reads_merged_tokens`` module (CaiT class attention): the merged tokens and their sizes."""
    plain = type(mod).forward

    def forward(x: Tensor, tokens: Tensor, grid: tuple[int, int] | None = None, **kwargs) -> Tensor:
        tokens = state.merged(tokens)
        size = state.size
        if size is None:
            return plain(mod, x, tokens, grid, **kwargs)
        if size.shape[:2] != tokens.shape[:2]:
            raise ValueError(f"{type(mod).__name__} got {tuple(tokens.shape)} tokens, but the last merged forward "
                             f"left sizes for {tuple(size.shape[:2])}: run it on the tokens of that forward")
        return plain(mod, x, tokens, None, size=size if state.prop_attn else None, **kwargs)

    return forward


def _intermediates_forward(model: nn.Module, state: ToMeState) -> Callable[..., object]:
    """``forward_intermediates`` on full patch grids (see the module docstring)."""
    plain = type(model).forward_intermediates

    def forward_intermediates(x: Tensor, *args, **kwargs) -> object:
        was = state.full_tokens
        state.full_tokens = True
        try:
            out = plain(model, x, *args, **kwargs)
        finally:
            state.full_tokens = was
        src = state.source
        if not isinstance(out, tuple) or src is None or out[0].shape[1] < src.shape[2]:
            return out
        final, maps = out
        lead = final.shape[1] - src.shape[2]  # tokens before the merged stage's (CaiT's class token)
        return torch.cat([final[:, :lead], regroup_tokens(final[:, lead:], src)], dim=1), maps

    return forward_intermediates


def _readers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "reads_merged_tokens", False)]


def apply_tome(model: nn.Module, r: Schedule, prop_attn: bool = True, trace_source: bool = False,
               protected: int | None = None) -> nn.Module:
    """Patch every shared ``Block`` of ``model`` (in place) to merge tokens; returns ``model``.

    Args:
        model: A vitlab backbone whose blocks are :class:`~vitlab.components.layers.Block` with
            global self-attention (ViT, DeiT, CaiT's self-attention stage).
        r: Merge schedule (see :func:`parse_r`); 0 everywhere leaves the outputs bit-identical.
        prop_attn: Add ``log(size)`` to the attention logits (proportional attention).
        trace_source: Keep the (B, N, N_orig) source matrix after every block in :func:`tome_state`
            (the explainability tools switch it on by themselves while they run).
        protected: Prefix tokens never merged; by default read from ``model.token_layout``.

    Raises:
        ValueError: For a bad schedule, blocks that need the token grid, or grad checkpointing.
    """
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("token merging does not work with activation checkpointing (a recomputed block would "
                         "merge twice): call model.set_grad_checkpointing(False) first")
    if "_evit_state" in model.__dict__:
        raise ValueError("token merging and EViT both replace the blocks' forward: call remove_evit(model) first")
    remove_tome(model)
    blocks = _tome_blocks(model)
    names = [n for n, _ in blocks]
    prot = [protected] * len(names) if protected is not None else _protected_tokens(model, names)
    state = ToMeState(parse_r(r, len(blocks)), prot, prop_attn, trace_source, names)
    for i, (_, blk) in enumerate(blocks):
        blk.forward = _tome_forward(blk, i, state)  # instance attribute shadows Block.forward
    for mod in _readers(model):
        mod.forward = _reader_forward(mod, state)
    if callable(getattr(type(model), "forward_intermediates", None)):
        model.forward_intermediates = _intermediates_forward(model, state)
    model._tome_state = state
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome` (a no-op on an unpatched model); returns ``model``."""
    state = model.__dict__.pop("_tome_state", None)
    if state is not None:
        for mod in [blk for _, blk in _tome_blocks(model)] + _readers(model):
            mod.__dict__.pop("forward", None)
        model.__dict__.pop("forward_intermediates", None)
    return model


def tome_state(model: nn.Module) -> ToMeState:
    """The :class:`ToMeState` of a patched model (sizes and sources of its last forward)."""
    state = model.__dict__.get("_tome_state")
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched for token merging: call apply_tome(model, r) first")
    return state


@contextlib.contextmanager
def tome(model: nn.Module, r: Schedule, prop_attn: bool = True, trace_source: bool = False,
         protected: int | None = None) -> Iterator[ToMeState]:
    """Context manager form of :func:`apply_tome`; the model is restored on exit."""
    apply_tome(model, r, prop_attn, trace_source, protected)
    try:
        yield tome_state(model)
    finally:
        remove_tome(model)


__all__ = ["Schedule", "ToMeState", "apply_tome", "bipartite_soft_matching", "expand_tokens", "merge_source",
           "merge_wavg", "parse_r", "regroup_tokens", "remove_tome", "token_groups", "tome", "tome_state",
           "unmerge_tokens"]
