"""Sparse attention patterns on the token grid, through FlexAttention where torch has it.

Two patterns restrict which patch tokens attend to which; prefix tokens (class, distillation,
registers; counted from ``token_layout``) attend to everything and are attended by everything:

* ``"local"``: patch (r, c) attends to the patches within the ``window`` x ``window``
  neighbourhood centred on it (``|dr| <= window // 2`` and ``|dc| <= window // 2``; odd window).
* ``"block"``: the grid is cut into ``window`` x ``window`` blocks (the last row / column of
  blocks may be smaller); a patch attends to the patches of its own block.

Each pattern is a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (:func:`mask_mod`),
usable by ``torch.nn.attention.flex_attention.create_block_mask``. Paths, chosen per call:

* ``"flex"`` / ``"flex_compiled"``: ``flex_attention`` with the cached ``BlockMask`` (eager, or
  ``torch.compile``-d with ``compile=True``). Eager flex is torch's reference implementation:
  it materialises the full score matrix, so it is exact but not faster.
* ``"dense"``: the equivalent dense boolean mask, as an additive 0 / -inf bias through the
  shared :meth:`~vitlab.components.attention.AttentionBase.attend` (SDPA). Taken with
  ``backend="dense"``, when torch has no FlexAttention, with an extra ``attn_bias``, for
  attention dropout in training (flex has no dropout) and when a gradient is needed on CPU
  (torch's flex has no CPU backward).
* ``"explicit"``: the same bias on the explicit path, inside ``capture_attention`` /
  ``explicit_attention``, so the recorded probabilities show the pattern.

The path of the last call is in :class:`SparseAttentionState` (``path``; ``fallback`` says why
flex was not used when it was asked for). The patch is applied from outside:
:func:`apply_sparse_attention` replaces the ``forward`` of the self-attention of every shared
:class:`~vitlab.components.layers.Block` (ViT, DeiT); :func:`remove_sparse_attention` restores it.

Example:
    >>> with sparse_attention(model, "local", window=7) as state:
    ...     logits = model(images)
    >>> state.path
    'flex'
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from .attention import Attention
from .layers import Block

Pattern = Literal["local", "block"]
Backend = Literal["flex", "dense"]
MaskMod = Callable[[Any, Any, Tensor, Tensor], Tensor]


@functools.lru_cache(maxsize=None)
def flex_functions() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """``(flex_attention, create_block_mask)`` from torch, or None when this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


def flex_available() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    return flex_functions() is not None


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable[..., Any]:
    fns = flex_functions()
    assert fns is not None
    return torch.compile(fns[0], dynamic=False)


def check_window(pattern: str, window: int) -> None:
    """Raise a ValueError unless ``window`` suits ``pattern`` (an odd int >= 1 for local, an int >= 1 for block)."""
    if pattern not in ("local", "block"):
        raise ValueError(f"pattern must be 'local' (k x k neighbourhood) or 'block' (b x b blocks), got {pattern!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1 (tokens per side), got {window!r}")
    if pattern == "local" and window % 2 == 0:
        raise ValueError(f"a local window is centred on its token, so it must be odd (3, 5, 7, ...), got {window}")


def mask_mod(pattern: Pattern, window: int, grid: tuple[int, int], prefix: int = 0) -> MaskMod:
    """The FlexAttention ``mask_mod`` of a pattern on [``prefix`` tokens, ``grid`` patches in raster order].

    Args:
        pattern: ``"local"`` or ``"block"`` (see the module docstring).
        window: Neighbourhood side (odd) or block side, in tokens.
        grid: (rows, columns) of the patch tokens.
        prefix: Leading tokens that attend to and are attended by every token.

    Returns:
        ``mask_mod(b, h, q_idx, kv_idx)``: True where query ``q_idx`` may attend to key ``kv_idx``;
        elementwise, so it also takes broadcastable index tensors.
    """
    check_window(pattern, window)
    cols, radius = grid[1], window // 2

    def local(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp, kp = q_idx - prefix, kv_idx - prefix  # indices on the grid (negative for prefix tokens)
        near = ((qp // cols - kp // cols).abs() <= radius) & ((qp % cols - kp % cols).abs() <= radius)
        return (q_idx < prefix) | (kv_idx < prefix) | near

    def block(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp, kp = q_idx - prefix, kv_idx - prefix
        same = (qp // cols // window == kp // cols // window) & (qp % cols // window == kp % cols // window)
        return (q_idx < prefix) | (kv_idx < prefix) | same

    return local if pattern == "local" else block


def dense_mask(mod: MaskMod, n: int, device: torch.device | str | None = None) -> Tensor:
    """The (N, N) boolean mask of a ``mask_mod`` (True: may attend)."""
    idx = torch.arange(n, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mod(zero, zero, idx[:, None], idx[None, :])  # (N, 1) x (1, N) -> (N, N)


@dataclass
class SparseAttentionState:
    """Settings of a patched model and the path its last attention call took.

    Attributes:
        pattern: ``"local"`` or ``"block"``.
        window: Neighbourhood or block side, in tokens.
        backend: Asked-for backend, ``"flex"`` or ``"dense"``.
        compile: ``torch.compile`` the flex kernel.
        grid: Patch grid the masks are built for.
        prefix: Prefix tokens (attend and are attended everywhere).
        blocks: Names of the patched attention modules.
        path: Path of the last call: ``"flex"``, ``"flex_compiled"``, ``"dense"`` or ``"explicit"``.
        fallback: Why the last call did not use flex although ``backend="flex"`` (else None).
    """

    pattern: Pattern
    window: int
    backend: Backend
    compile: bool
    grid: tuple[int, int]
    prefix: int
    blocks: list[str]
    path: str | None = None
    fallback: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def mask_mod(self) -> MaskMod:
        return mask_mod(self.pattern, self.window, self.grid, self.prefix)

    def dense_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(N, N) boolean mask (True: may attend), cached per device."""
        key = ("mask", str(device))
        if key not in self._cache:
            self._cache[key] = dense_mask(self.mask_mod, self.num_tokens, device)
        return self._cache[key]

    def dense_bias(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(N, N) additive bias: 0 where the mask allows, -inf elsewhere (cached per device and dtype)."""
        key = ("bias", str(device), dtype)
        if key not in self._cache:
            mask = self.dense_mask(device)
            self._cache[key] = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(~mask, float("-inf"))
        return self._cache[key]

    def block_mask(self, device: torch.device) -> Any:
        """The FlexAttention ``BlockMask`` (batch and heads broadcast), cached per device."""
        key = ("block", str(device))
        if key not in self._cache:
            fns = flex_functions()
            assert fns is not None
            n = self.num_tokens
            self._cache[key] = fns[1](self.mask_mod, None, None, n, n, device=device)
        return self._cache[key]


def _flex_refusal(attn: Attention, state: SparseAttentionState, attn_bias: Tensor | None, q: Tensor) -> str | None:
    """Why this call cannot take the flex path (None: it can)."""
    if state.backend != "flex":
        return "backend='dense'"
    if not flex_available():
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if attn._capture is not None or attn._force_explicit:
        return "explicit attention (capture) records the probabilities"
    if attn_bias is not None:
        return "an extra attn_bias is added on the dense path"
    if attn.training and attn.attn_drop > 0:
        return "flex_attention has no attention dropout"
    if q.device.type == "cpu" and q.requires_grad:
        return "flex_attention has no backward on CPU (torch raises NotImplementedError)"
    return None


def _sparse_forward(attn: Attention, state: SparseAttentionState) -> Callable[..., Tensor]:
    def forward(x: Tensor, attn_bias: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        n = x.shape[1]
        if n != state.num_tokens:
            raise ValueError(f"sparse attention was set up for {state.prefix} prefix token(s) + a "
                             f"{state.grid[0]}x{state.grid[1]} grid ({state.num_tokens} tokens), got {n} tokens: "
                             "pass image_size=<the input size> to apply_sparse_attention (token merging and EViT "
                             "change the token count between blocks: they do not combine with sparse attention)")
        q, k, v = attn.qkv_heads(x)  # each (B, heads, N, d)
        why = _flex_refusal(attn, state, attn_bias, q)
        if why is None:
            fn = _compiled_flex() if state.compile else flex_functions()[0]  # type: ignore[index]
            out = fn(q, k, v, block_mask=state.block_mask(x.device), scale=attn.scale)
            state.path, state.fallback = ("flex_compiled" if state.compile else "flex"), None
        else:
            bias = state.dense_bias(x.device, q.dtype)  # (N, N), broadcast over batch and heads
            if attn_bias is not None:
                bias = bias + attn_bias
            out = attn.attend(q, k, v, bias)
            explicit = attn._capture is not None or attn._force_explicit
            state.path = "explicit" if explicit else "dense"
            state.fallback = why if state.backend == "flex" else None
        return attn.project(out)

    return forward


def _sparse_blocks(model: nn.Module, locations: Sequence[int] | None) -> list[tuple[str, Attention]]:
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no vitlab Block to apply sparse attention to")
    if locations is not None:
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(blocks) for i in locations) \
                or not locations or len(set(locations)) != len(locations):
            raise ValueError(f"locations must be distinct block indices in [0, {len(blocks)}), got {locations!r}")
        blocks = [blocks[i] for i in sorted(locations)]
    out = []
    for name, blk in blocks:
        attn = blk.attn
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward or attn.rel_pos is not None:
            raise ValueError(f"sparse attention replaces plain global self-attention; {name}.attn is "
                             f"{type(attn).__name__}{' with relative positions' if getattr(attn, 'rel_pos', None) else ''}"
                             " (window, talking-heads or relative-position attention has its own computation)")
        out.append((f"{name}.attn", attn))
    return out


def _grid_layout(model: nn.Module, names: list[str], image_size: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, patch grid) shared by the attention modules ``names``, from ``token_layout``."""
    layout_fn = getattr(model, "token_layout", None)
    config = getattr(model, "config", None)
    if layout_fn is None or config is None:
        raise ValueError(f"{type(model).__name__} has no token_layout, so its token grid is unknown: sparse "
                         "attention needs a vitlab backbone")
    size = tuple(config.image_size) if image_size is None else (
        (image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
    layout = {a.module: a for a in layout_fn(size).attention}
    found = set()
    for name in names:
        entry = layout.get(name)
        segs = entry.queries if entry is not None else ()
        grids = [i for i, s in enumerate(segs) if s.grid is not None]
        if entry is None or len(grids) != 1 or grids[0] != len(segs) - 1 or entry.keys != entry.queries:
            raise ValueError(f"sparse attention needs self-attention over [prefix tokens, one patch grid]; the "
                             f"token_layout of {type(model).__name__} gives {name} no such grid")
        found.add((grids[0], segs[-1].grid.shape))
    if len(found) != 1:
        raise ValueError(f"the patched blocks of {type(model).__name__} see different token grids: {sorted(found)}")
    prefix, grid = found.pop()
    return prefix, tuple(grid)  # type: ignore[return-value]


def apply_sparse_attention(model: nn.Module, pattern: Pattern = "local", window: int = 7, backend: Backend = "flex",
                           compile: bool = False, image_size: int | tuple[int, int] | None = None,
                           locations: Sequence[int] | None = None) -> nn.Module:
    """Patch the self-attention of the shared ``Block``\\ s of ``model`` (in place) to a sparse pattern; returns ``model``.

    Args:
        model: A vitlab backbone whose blocks use plain global self-attention (ViT, DeiT).
        pattern: ``"local"`` (``window`` x ``window`` neighbourhood) or ``"block"`` (own block).
        window: Neighbourhood side (odd) or block side, in tokens; a local window of
            ``2 * max(grid) - 1`` or a block of ``max(grid)`` covers the whole grid.
        backend: ``"flex"`` (FlexAttention, falling back to the dense mask where torch lacks it)
            or ``"dense"`` (a dense mask through SDPA).
        compile: ``torch.compile`` the flex kernel (the first call compiles).
        image_size: Input size the masks are built for; ``config.image_size`` by default.
        locations: 0-based indices of the blocks to patch; all by default.

    Raises:
        ValueError: For a bad pattern, window or backend, attention that is not plain
            self-attention, or a model without a token grid in ``token_layout``.
    """
    check_window(pattern, window)
    if backend not in ("flex", "dense"):
        raise ValueError(f"backend must be 'flex' (FlexAttention) or 'dense' (boolean mask through SDPA), got {backend!r}")
    remove_sparse_attention(model)
    mods = _sparse_blocks(model, locations)
    names = [n for n, _ in mods]
    prefix, grid = _grid_layout(model, names, image_size)
    state = SparseAttentionState(pattern, window, backend, bool(compile), grid, prefix, names)
    for _, attn in mods:
        attn.forward = _sparse_forward(attn, state)  # instance attribute shadows Attention.forward
    model._sparse_attention_state = state
    model._sparse_attention_modules = [m for _, m in mods]
    return model


def remove_sparse_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_sparse_attention` (a no-op on an unpatched model); returns ``model``."""
    model.__dict__.pop("_sparse_attention_state", None)
    for attn in model.__dict__.pop("_sparse_attention_modules", []):
        attn.__dict__.pop("forward", None)
    return model


def sparse_attention_state(model: nn.Module) -> SparseAttentionState:
    """The :class:`SparseAttentionState` of a patched model (its masks and the path of its last call)."""
    state = model.__dict__.get("_sparse_attention_state")
    if state is None:
        raise ValueError(f"{type(model).__name__} has no sparse attention: call apply_sparse_attention(model) first")
    return state


@contextlib.contextmanager
def sparse_attention(model: nn.Module, pattern: Pattern = "local", window: int = 7, backend: Backend = "flex",
                     compile: bool = False, image_size: int | tuple[int, int] | None = None,
                     locations: Sequence[int] | None = None) -> Iterator[SparseAttentionState]:
    """Context manager form of :func:`apply_sparse_attention`; the model is restored on exit."""
    apply_sparse_attention(model, pattern, window, backend, compile, image_size, locations)
    try:
        yield sparse_attention_state(model)
    finally:
        remove_sparse_attention(model)


__all__ = ["Backend", "Pattern", "SparseAttentionState", "apply_sparse_attention", "check_window", "dense_mask",
           "flex_available", "mask_mod", "remove_sparse_attention", "sparse_attention", "sparse_attention_state"]
