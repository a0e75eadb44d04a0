"""Merged tokens back on the patches: what the explainability tools need from token merging.

After a forward with source tracking, ``ToMeState.sources[i]`` says which original tokens each
token after patched block ``i`` stands for (:mod:`vitlab.components.tome`). From it:

* **Attention of a block on the patches** (:func:`expand_attention`): a merged query stands for
  each of its patches (every patch gets its token's row); a merged key of size s stands for s
  patches, and each gets 1/s of the key's attention. With proportional attention this is exact:
  the block computes the same as the plain block on the unmerged sequence where every merged
  token is repeated once per patch (a key of size s gets ``exp(l + log s) = s exp(l)``, i.e. s
  copies of ``exp(l)``), and the expanded matrix is that plain block's attention. Without
  proportional attention it is a bookkeeping choice: rows still sum to 1 and every token's total
  attention is kept, spread evenly over its patches.
* **The merge between blocks** needs no step of its own on the patches. On the tokens,
  attention rollout multiplies the size-weighted average ``M = S_i S_{i-1}^T / size`` (N_i, N_{i-1})
  in after each block that merged; on the patches, later layers read a merged token's rows only
  through its keys, i.e. as the mean over its patches (the 1/s above), and
  ``(S_i / size_i) = M (S_{i-1} / size_{i-1})``: the mean over the new group of patches is the
  size-weighted mean of the old groups' means. So plain rollout over the expanded matrices,
  read out at the protected class token or as the mean over all patches, equals the token-level
  rollout with the merges (``tests/test_tome_explain.py`` checks it against a loop reference).
  ``discard_ratio`` then discards on the patch-level matrices.

Both act on one attention call's query / key sequence as the backbone's ``token_layout``
describes it (prefix tokens and the full patch grid); :func:`attention_traces` matches the
recorded calls of a patched model to its sources.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .tome import ToMeState

__all__ = ["MergeTrace", "attention_traces", "cover", "expand_attention", "merge_state", "tracing_sources"]


def merge_state(model: nn.Module) -> ToMeState | None:
    """The model's :class:`~vitlab.components.tome.ToMeState`, or None when it is not patched."""
    return model.__dict__.get("_tome_state")


@contextlib.contextmanager
def tracing_sources(model: nn.Module) -> Iterator[ToMeState | None]:
    """Source tracking on while the context runs (a no-op on a model without token merging)."""
    state = merge_state(model)
    if state is None:
        yield None
        return
    was = state.trace_source
    state.trace_source = True
    try:
        yield state
    finally:
        state.trace_source = was


def cover(source: Tensor, total: int) -> Tensor:
    """A source (B, N_now, N_orig) over a sequence of ``total`` laid-out tokens: (B, lead + N_now, total).

    The ``lead = total - N_orig`` tokens before the merged ones (CaiT's class token in front of
    its merged patch tokens) stand for themselves.
    """
    b, n_now, n_orig = source.shape
    lead = total - n_orig
    if lead < 0:
        raise ValueError(f"a source over {n_orig} tokens does not fit a sequence of {total} tokens")
    out = source.new_zeros(b, lead + n_now, total)
    out[:, torch.arange(lead), torch.arange(lead)] = 1.0
    out[:, lead:, lead:] = source
    return out


def expand_attention(probs: Tensor, query: Tensor | None, key: Tensor | None) -> Tensor:
    """Attention over merged tokens (B, heads, Nq, Nk) -> over the laid-out tokens (B, heads, Tq, Tk).

    Args:
        probs: Recorded attention (or any per-key weights, e.g. gradient-weighted attention).
        query: (B, Nq, Tq) 0/1: the laid-out tokens each query stands for (None: as laid out).
        key: (B, Nk, Tk) 0/1 likewise for the keys (None: as laid out).

    Returns:
        ``query^T @ probs @ (key / size)``: every patch of a query gets its row, every patch of
        a key of size s gets 1/s of its column (see the module docstring).
    """
    out = probs
    if key is not None:
        spread = (key / key.sum(dim=-1, keepdim=True)).to(probs.dtype)  # (B, Nk, Tk), rows sum to 1
        out = out @ spread[:, None]  # (B, heads, Nq, Nk) @ (B, 1, Nk, Tk)
    if query is not None:
        group = query.argmax(dim=1)  # (B, Tq): the query each laid-out token belongs to
        b, h, _, tk = out.shape
        out = out.gather(2, group[:, None, :, None].expand(b, h, -1, tk))  # (B, heads, Tq, Tk)
    return out


@dataclass
class MergeTrace:
    """How one recorded attention call of a merged model lies on the laid-out tokens.

    Attributes:
        query: (B, Nq, Tq) 0/1: the laid-out query tokens each recorded query stands for (None:
            the queries are as laid out).
        key: (B, Nk, Tk) likewise for the keys.
    """

    query: Tensor | None = None
    key: Tensor | None = None


def attention_traces(model: nn.Module, calls: Sequence[tuple[str, tuple[int, int], tuple[int, int]]]
                     ) -> list[MergeTrace] | None:
    """Match recorded attention calls of a patched model to its sources (last forward).

    Args:
        model: A model patched by :func:`~vitlab.components.tome.apply_tome`.
        calls: Per recorded call, in call order: (module name, (recorded queries, recorded keys),
            (laid-out queries, laid-out keys)).

    Returns:
        One :class:`MergeTrace` per call, or None for a model without token merging.

    Raises:
        ValueError: When the calls' token counts need sources the last forward did not keep
            (it ran without source tracking) or do not match them.
    """
    state = merge_state(model)
    if state is None:
        return None
    index = {f"{name}.attn": i for i, name in enumerate(state.blocks)}
    traced = len(state.sources) == len(state.blocks)
    out = []
    for name, (nq, nk), (tq, tk) in calls:
        if (nq, nk) == (tq, tk) and not traced:
            out.append(MergeTrace())
            continue
        if not traced:
            raise ValueError(f"{name} attended over {nq} x {nk} merged tokens, and the forward kept no token sources: "
                             "run it with source tracking (apply_tome(..., trace_source=True); the explainability "
                             "tools switch it on by themselves)")
        i = index.get(name)
        if i is None:  # a call after the merged stage (CaiT's class attention) sees the final tokens
            before = state.source
        else:  # patched block i attends over the tokens block i - 1 left
            before = state.sources[i - 1] if i > 0 else None
        out.append(MergeTrace(_cover_or_none(before, nq, tq, name), _cover_or_none(before, nk, tk, name)))
    return out


def _cover_or_none(source: Tensor | None, recorded: int, total: int, name: str) -> Tensor | None:
    if recorded == total:
        return None
    if source is None or total - source.shape[2] + source.shape[1] != recorded:
        have = "no merge" if source is None else f"{source.shape[1]} merged of {source.shape[2]} tokens"
        raise ValueError(f"{name} recorded {recorded} tokens where its layout has {total}, and the sources of the "
                         f"last forward ({have}) do not explain it: were the records taken from that forward?")
    return cover(source, total)
