"""Attention for every vitlab family, and the attention-capture context.

There is one attention computation, :meth:`AttentionBase.attend`. Its default path is
``F.scaled_dot_product_attention`` (fused kernels); its explicit path computes the
probabilities, so they can be recorded or edited (talking heads). The explicit path is
taken only inside :func:`capture_attention` / :func:`explicit_attention` or when a family
passes a logits/probabilities hook, so SDPA stays the default for ordinary forward passes.

Families add their paper's idea on top: :class:`Attention` (self-attention with fused qkv),
:class:`CrossAttention` (queries from one sequence, keys/values from another: cross-attention,
class attention, spatial-reduction attention), :class:`WindowAttention` (local attention in
non-overlapping windows with relative position bias and an optional cyclic shift). Self- and window
attention take an optional :class:`~vitlab.components.embeddings.DecomposedRelPos` (ViTDet): its
bias depends on the queries, so it is computed in ``forward`` after the qkv projection.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import DecomposedRelPos, RelativePositionBias, to_2tuple

TensorFn = Callable[[Tensor], Tensor]


@dataclass
class AttentionRecord:
    """Attention probabilities recorded from one call of one attention module.

    Attributes:
        name: Qualified module name inside the model (e.g. ``blocks.3.attn``).
        probs: Probabilities, (B', heads, N_query, N_key); B' is B times the number of
            windows for window attention.
        info: What the module knew about the layout: token grid, window size, shift,
            number of prefix tokens, key grid for reduced keys.
    """

    name: str
    probs: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class AttentionCapture:
    """Collects :class:`AttentionRecord` objects in call order (see :func:`capture_attention`)."""

    def __init__(self, detach: bool = True) -> None:
        self.detach = detach
        self.records: list[AttentionRecord] = []

    def add(self, name: str, probs: Tensor, info: dict[str, Any]) -> None:
        self.records.append(AttentionRecord(name, probs.detach() if self.detach else probs, dict(info)))

    @property
    def maps(self) -> list[Tensor]:
        """The recorded probability tensors, in call order."""
        return [r.probs for r in self.records]

    def clear(self) -> None:
        self.records.clear()

    def __len__(self) -> int:
        return len(self.records)


class AttentionBase(nn.Module):
    """Holds the heads/scale/dropout settings, the output projection and the one attention computation."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if heads <= 0:
            raise ValueError(f"heads must be positive, got {heads}")
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
            head_dim = dim // heads
        self.dim = dim
        self.heads = heads
        self.head_dim = head_dim
        self.inner_dim = heads * head_dim
        self.scale = head_dim**-0.5
        self.attn_drop = attn_drop
        self.proj = nn.Linear(self.inner_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set by capture_attention / explicit_attention; never saved in state dicts.
        self._capture: AttentionCapture | None = None
        self._capture_name = ""
        self._force_explicit = False
        self.capture_info: dict[str, Any] = {}

    def split_heads(self, x: Tensor) -> Tensor:
        # (B, N, heads * head_dim) -> (B, heads, N, head_dim)
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        # (B, heads, N, head_dim) -> (B, N, heads * head_dim)
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def project(self, out: Tensor) -> Tensor:
        """Per-head outputs (B, heads, N, head_dim) -> merged, projected tokens (B, N, dim)."""
        return self.proj_drop(self.proj(self.merge_heads(out)))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None = None,
        logits_fn: TensorFn | None = None,
        probs_fn: TensorFn | None = None,
    ) -> Tensor:
        """Multi-head attention of (B, heads, Nq, d) queries on (B, heads, Nk, d) keys/values.

        Args:
            q, k, v: Per-head queries, keys and values.
            bias: Additive float bias broadcastable to (B, heads, Nq, Nk): relative position
                bias, window masks (large negative values block attention).
            logits_fn: Applied to the scaled logits before softmax (forces the explicit path).
            probs_fn: Applied to the probabilities after softmax (forces the explicit path).
                Under capture the softmax probabilities are recorded (rows sum to 1) and what
                ``probs_fn`` returns, the weights that multiply v, goes in ``info["mixed_probs"]``.

        Returns:
            (B, heads, Nq, d).
        """
        p = self.attn_drop if self.training else 0.0
        explicit = self._force_explicit or self._capture is not None or logits_fn is not None or probs_fn is not None
        if not explicit:
            mask = bias.to(q.dtype) if bias is not None else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
        if bias is not None:
            logits = logits + bias
        if logits_fn is not None:
            logits = logits_fn(logits)
        probs = logits.softmax(dim=-1)
        info = self.capture_info
        if probs_fn is not None:
            mixed = probs_fn(probs)
            if self._capture is not None:
                info = {**info, "mixed_probs": mixed.detach() if self._capture.detach else mixed}
        if self._capture is not None:
            self._capture.add(self._capture_name, probs, info)
        if probs_fn is not None:
            probs = mixed
        probs = F.dropout(probs, p=p, training=self.training)
        return probs @ v


class Attention(AttentionBase):
    """Multi-head self-attention with a fused qkv projection.

    Args:
        dim: Token width.
        heads: Number of heads.
        qkv_bias: Bias in the qkv projection.
        attn_drop: Dropout on the attention probabilities (training only).
        proj_drop: Dropout after the output projection.
        head_dim: Per-head width; ``dim // heads`` by default.
        rel_pos: Optional decomposed relative position (ViTDet) added to the logits; ``forward``
            then needs the token ``grid`` (prefix tokens before the grid get no bias).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
        rel_pos: DecomposedRelPos | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, 3 * self.inner_dim, bias=qkv_bias)
        self.rel_pos = rel_pos
        #: While True, ``qkv_heads`` keeps its keys (B, heads, N, d) in ``last_keys`` (token merging reads them).
        self.keep_keys = False
        self.last_keys: Tensor | None = None
        #: While True, ``qkv_heads`` keeps its queries (B, heads, N, d) in ``last_queries`` (EViT reads them).
        self.keep_queries = False
        self.last_queries: Tensor | None = None

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project tokens to per-head q, k, v, each (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        # (B, N, 3 * heads * d) -> (3, B, heads, N, d)
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.keep_keys:
            self.last_keys = qkv[1]
        if self.keep_queries:
            self.last_queries = qkv[0]
        return qkv[0], qkv[1], qkv[2]

    def rel_pos_bias(self, q: Tensor, grid: tuple[int, int] | None, bias: Tensor | None = None) -> Tensor | None:
        """``bias`` plus the decomposed relative position bias of queries q (B, heads, N, d) on ``grid``.

        Unchanged without ``rel_pos``. The grid tokens are the last h*w of N; the rows and
        columns of the prefix tokens before them get zero (MViTv2's rule for a class token).
        """
        if self.rel_pos is None:
            return bias
        if grid is None:
            raise ValueError(f"{type(self).__name__} with decomposed relative position needs the token grid "
                             "(grid=(H, W))")
        prefix = q.shape[2] - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"{type(self).__name__} got {q.shape[2]} tokens for a {grid[0]}x{grid[1]} grid")
        rp = self.rel_pos(q[:, :, prefix:], grid)  # (B, heads, h*w, h*w)
        if prefix:
            rp = F.pad(rp, (prefix, 0, prefix, 0))  # (B, heads, N, N), zero for prefix rows / columns
        return rp if bias is None else bias + rp

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.project(self.attend(q, k, v, self.rel_pos_bias(q, grid, attn_bias)))


class CrossAttention(AttentionBase):
    """Queries from ``x``, keys and values from ``context`` (``x`` itself when None).

    The building block of cross-attention fusion (CrossViT), class attention (CaiT: the class
    token queries all tokens) and spatial-reduction attention (PVT: keys/values from a
    reduced token grid).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
        context_dim: int | None = None,
    ) -> None:
        super().__init__(dim, heads, head_dim, attn_drop, proj_drop)
        self.q = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * self.inner_dim, bias=qkv_bias)

    def kv_heads(self, context: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = context.shape
        # (B, N, 2 * heads * d) -> (2, B, heads, N, d)
        kv = self.kv(context).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: Tensor, context: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        q = self.split_heads(self.q(x))
        k, v = self.kv_heads(x if context is None else context)
        return self.project(self.attend(q, k, v, attn_bias))


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """Split a (B, H, W, C) map into windows: (B * nW, wh * ww, C). H, W must be multiples."""
    b, h, w, c = x.shape
    wh, ww = window
    # (B, H, W, C) -> (B, H/wh, wh, W/ww, ww, C) -> (B, H/wh, W/ww, wh, ww, C)
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: Tensor, window: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    wh, ww = window
    h, w = grid
    c = windows.shape[-1]
    # (B * nW, wh * ww, C) -> (B, H/wh, W/ww, wh, ww, C) -> (B, H, W, C)
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device=None) -> Tensor:
    """Additive mask (nW, N, N) that stops tokens of different regions meeting in a shifted window.

    After a cyclic shift, a window at the border holds tokens from opposite sides of the
    image; tokens may attend only within their own region (value 0), else -100.
    """
    h, w = grid
    labels = torch.zeros(1, h, w, 1, device=device)
    region = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            labels[:, hs, ws, :] = region
            region += 1
    lw = window_partition(labels, window).squeeze(-1)  # (nW, N)
    diff = lw.unsqueeze(1) - lw.unsqueeze(2)  # (nW, N, N)
    return diff.ne(0).float() * -100.0


class WindowAttention(Attention):
    """Local self-attention inside non-overlapping windows of the token grid.

    Tokens (B, H*W, C) are laid out on ``grid``, padded to a multiple of the window,
    optionally cyclically shifted by ``shift`` (Swin's shifted windows, with the mask that
    keeps regions apart), attended within each window with an optional relative position
    bias, then put back. A window larger than the grid is clipped to it (and the shift
    dropped), as Swin does at low resolution; with ``clip=False`` it is not (the grid is
    zero-padded up to the window, as detectron2's ViTDet does).

    With ``rel_pos`` (a :class:`~vitlab.components.embeddings.DecomposedRelPos` made for the
    window) each window's queries add their decomposed relative position bias (ViTDet).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window_size: int | tuple[int, int] = 7,
        shift: int | tuple[int, int] = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        relative_position_bias: bool = True,
        clip: bool = True,
        rel_pos: DecomposedRelPos | None = None,
    ) -> None:
        super().__init__(dim, heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, rel_pos=rel_pos)
        self.window_size = to_2tuple(window_size)
        self.shift = to_2tuple(shift)
        self.clip = clip
        self.relative_position = RelativePositionBias(self.window_size, heads) if relative_position_bias else None

    def layout(self, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Window and shift actually used on a token grid (clipped when the grid is small, unless ``clip=False``)."""
        if not self.clip:
            return self.window_size, self.shift
        window = tuple(min(g, w) for g, w in zip(grid, self.window_size))
        shift = tuple(0 if g <= w else s for g, w, s in zip(grid, self.window_size, self.shift))
        return window, shift  # type: ignore[return-value]

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        if grid is None:
            raise ValueError("WindowAttention needs the token grid (H, W)")
        b, n, c = x.shape
        h, w = grid
        window, shift = self.layout(grid)
        x = x.view(b, h, w, c)
        ph, pw = (-h) % window[0], (-w) % window[1]
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        shifted = any(shift)
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window)  # (B * nW, wh * ww, C)
        nw = windows.shape[0] // b
        bias = None
        if self.relative_position is not None:
            bias = self.relative_position(window).unsqueeze(0)  # (1, heads, N, N)
        if shifted:
            mask = shifted_window_mask((hp, wp), window, shift, device=x.device)  # (nW, N, N)
            mask = mask.unsqueeze(1)  # (nW, 1, N, N)
            bias = mask if bias is None else bias + mask  # (nW, heads, N, N)
            # (nW, heads, N, N) -> (B * nW, heads, N, N), window index fastest like windows
            bias = bias.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * nw, *bias.shape[1:])
        if attn_bias is not None:
            bias = attn_bias if bias is None else bias + attn_bias
        self.capture_info = dict(grid=(h, w), padded_grid=(hp, wp), window=window, shift=shift, batch=b)
        q, k, v = self.qkv_heads(windows)
        if self.rel_pos is not None:
            rp = self.rel_pos(q, window)  # (B * nW, heads, N, N)
            bias = rp if bias is None else bias + rp
        out = self.project(self.attend(q, k, v, bias))
        x = window_reverse(out, window, (hp, wp))
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :h, :w, :].reshape(b, h * w, c)


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, AttentionBase]]:
    for name, m in model.named_modules():
        if isinstance(m, AttentionBase):
            yield name, m


@contextlib.contextmanager
def capture_attention(model: nn.Module, detach: bool = True) -> Iterator[AttentionCapture]:
    """Record the attention probabilities of every attention module of ``model``.

    Inside the context every vitlab attention takes its explicit path and appends an
    :class:`AttentionRecord` per call; outside it the fused SDPA path is used again.

    Args:
        model: Any module containing vitlab attention layers.
        detach: Record detached tensors; pass False to keep the graph (gradient rollout).

    Raises:
        ValueError: When the model has no vitlab attention module.

    Example:
        >>> with capture_attention(model) as cap:
        ...     model(x)
        >>> len(cap.maps) == model_depth
    """
    mods = list(_attention_modules(model))
    if not mods:
        raise ValueError(f"{type(model).__name__} has no vitlab attention module to capture")
    cap = AttentionCapture(detach=detach)
    for name, m in mods:
        m._capture, m._capture_name = cap, name
    try:
        yield cap
    finally:
        for _, m in mods:
            m._capture, m._capture_name = None, ""


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Use the explicit (matmul + softmax) path without recording, e.g. for FLOP counting."""
    mods = [m for _, m in _attention_modules(model)]
    for m in mods:
        m._force_explicit = True
    try:
        yield
    finally:
        for m in mods:
            m._force_explicit = False
