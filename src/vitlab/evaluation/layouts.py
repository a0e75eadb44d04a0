"""Where every model's tokens lie on the image, from the backbone contract's ``token_layout``.

Explainability needs to know, for each attention call, which tokens asked (queries) and
which answered (keys), and where on the image each of them sits. vitlab's
:func:`~vitlab.components.capture_attention` records the probabilities with what the module
knew (``AttentionRecord.info``); the model describes its layout through
``Backbone.token_layout(image_size)`` (prefix tokens, token grids in input pixels, windows and
their shift, reduced key grids, the modules whose output is a feature map). This module
joins the two into one uniform description, :class:`AttentionLayer`, that every method in
:mod:`vitlab.evaluation` works on, without knowing any family: window attention is assembled
back into one (N, N) matrix per block over the stage's grid (the shift undone, padding
dropped), everything else is used as recorded.

Token grids are described in input-image pixels (:class:`TokenGrid`), so maps of any layer,
stage or branch land on the image whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import AttentionRecord, Segment, SegmentKey, TokenGrid, TokenLayout, window_partition
from ..components.tome_explain import attention_traces, expand_attention

__all__ = [
    "AttentionLayer", "FeaturePoint", "LayoutAdapter", "Segment", "SegmentKey", "TokenGrid", "adapter_for",
    "attention_layers", "grid_to_image", "has_attention", "overlap_matrix", "require_attention", "resolve_layers",
]


@dataclass
class AttentionLayer:
    """One attention call, described in image terms.

    Attributes:
        index: 1-based position among the model's attention layers (call order).
        name: Module name (``blocks.5.attn``).
        label: Human description (``block 6``, ``stage 2 block 2 (shifted windows)``).
        kind: ``self``, ``window``, ``spatial-reduction``, ``class`` or ``cross``.
        queries: Segments of the query sequence, in order.
        keys: Segments of the key sequence, in order.
        source: What the module recorded (for window attention: per window).
        info: What the module knew about the layout (window, shift, sr ratio, branch ...).
        assemble: Turns ``source`` into :attr:`probs` (window attention; merged tokens of token
            merging spread back on the patches); None when it is already.
    """

    index: int
    name: str
    label: str
    kind: str
    queries: tuple[Segment, ...]
    keys: tuple[Segment, ...]
    source: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    assemble: Callable[[Tensor], Tensor] | None = None

    @property
    def probs(self) -> Tensor:
        """(B, heads, N_query, N_key) probabilities over the query and key sequences.

        Window attention is assembled on each access and not kept: at high resolution the
        (N, N) matrices of all blocks together would not fit in memory. Attention over merged
        tokens (token merging) is spread back on the laid-out tokens the same way: each patch
        of a merged query gets its row, each patch of a merged key of size s 1/s of its column
        (see :mod:`vitlab.components.tome_explain`).
        """
        return self.source if self.assemble is None else self.assemble(self.source)

    @property
    def heads(self) -> int:
        return self.source.shape[1]

    @property
    def batch(self) -> int:
        return self.info["batch"] if self.assemble is not None else self.source.shape[0]

    def query_grid(self) -> Segment | None:
        return next((s for s in self.queries if s.is_grid), None)

    def key_grid(self) -> Segment | None:
        return next((s for s in self.keys if s.is_grid), None)

    def offset(self, segments: Sequence[Segment], key: SegmentKey) -> int:
        """Start of segment ``key`` in a query or key sequence."""
        start = 0
        for s in segments:
            if s.key == key:
                return start
            start += s.size
        raise KeyError(key)

    def query_names(self) -> list[str]:
        """Prefix tokens that ask in this layer (``cls``, ``dist``)."""
        return [s.key[0] for s in self.queries if not s.is_grid]


@dataclass
class FeaturePoint:
    """A place in the network whose output tokens (or map) Grad-CAM and PCA can read.

    Attributes:
        label: Human description (``block 11``, ``stage 4``, ``branch 0 stage 3``).
        module: The module whose forward output is read.
        prefix: Prefix tokens to drop from (B, P + N, C) output; None when the output is
            already a (B, C, H, W) map.
        grid: Token grid of the output at the given image size (None: from the forward's
            ``grid`` keyword).
        cell: Input pixels per token (or per map position) of the output.
        reaches_head: False when the output's patch tokens cannot influence the logits
            (the last block of a class-token-pooled model), so their gradient is zero.
        stream: The token stream of the output (a CrossViT branch; else 0).
    """

    label: str
    module: nn.Module
    prefix: int | None
    grid: TokenGrid | None
    cell: tuple[float, float]
    reaches_head: bool = True
    stream: int = 0


def overlap_matrix(src: TokenGrid, dst: TokenGrid) -> Tensor:
    """How each ``src`` token's area is shared among ``dst`` tokens: (N_src, N_dst), rows sum to 1.

    Used to carry attribution between grids: a stage's tokens after patch merging, a reduced
    key grid, another branch's grid. Rows of tokens that cover no ``dst`` token stay zero.
    """

    def axis(n_s: int, c_s: float, n_d: int, c_d: float) -> Tensor:
        s0 = torch.arange(n_s, dtype=torch.float64) * c_s
        d0 = torch.arange(n_d, dtype=torch.float64) * c_d
        lo = torch.maximum(s0[:, None], d0[None, :])
        hi = torch.minimum(s0[:, None] + c_s, d0[None, :] + c_d)
        return (hi - lo).clamp(min=0)  # (n_s, n_d) overlap lengths

    m = torch.kron(axis(src.shape[0], src.cell[0], dst.shape[0], dst.cell[0]),
                   axis(src.shape[1], src.cell[1], dst.shape[1], dst.cell[1]))  # (hs*ws, hd*wd)
    total = m.sum(dim=1, keepdim=True)
    return torch.where(total > 0, m / total.clamp(min=1e-12), m).float()


def grid_to_image(maps: Tensor, grid: TokenGrid, image_size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Token-grid maps (..., h, w) -> image maps (..., H, W).

    The grid is stretched to the pixels it covers (``shape * cell``, padding included) and cut
    to the image, so a token's value lands exactly on its patch whatever the input size.

    Args:
        maps: Values per token, (..., h, w).
        grid: The grid the values lie on.
        image_size: (H, W) of the input image.
        mode: ``"bilinear"`` (smooth) or ``"nearest"`` (one flat block per token).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {mode!r}")
    h, w = maps.shape[-2:]
    if (h, w) != tuple(grid.shape):
        raise ValueError(f"maps of shape {h}x{w} do not lie on a {grid.shape[0]}x{grid.shape[1]} grid")
    lead = maps.shape[:-2]
    H, W = image_size
    extent = (max(1, round(h * grid.cell[0])), max(1, round(w * grid.cell[1])))
    flat = maps.reshape(-1, 1, h, w).float()  # (..., h, w) -> (M, 1, h, w)
    kw: dict[str, Any] = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(flat, size=extent, mode=mode, **kw)[..., :H, :W]
    short_h, short_w = H - up.shape[-2], W - up.shape[-1]
    if short_h > 0 or short_w > 0:
        # A pixel short (fractional cells, rounding): repeat the edge. More: no token covers those
        # pixels (e.g. rows a strided spatial reduction drops), so they get nothing.
        rounding = short_h <= 1 and short_w <= 1
        up = F.pad(up, (0, max(short_w, 0), 0, max(short_h, 0)), mode="replicate" if rounding else "constant")
    return up.reshape(*lead, H, W)  # (M, 1, H, W) -> (..., H, W)


def window_ids(info: dict[str, Any]) -> Tensor:
    """Token index (raster over the unpadded grid; ``N`` for padding) of every window slot, (nW, n).

    Replays what :class:`~vitlab.components.WindowAttention` does to the tokens (pad, cyclic
    shift, partition), so slot ``j`` of window ``w`` in a record is token ``ids[w, j]``.
    """
    h, w = info["grid"]
    hp, wp = info["padded_grid"]
    sh, sw = info["shift"]
    n = h * w
    ids = torch.full((1, hp, wp, 1), n, dtype=torch.long)
    ids[0, :h, :w, 0] = torch.arange(n).view(h, w)  # (h*w,) -> (h, w)
    if sh or sw:
        ids = torch.roll(ids, shifts=(-sh, -sw), dims=(1, 2))
    return window_partition(ids, tuple(info["window"])).squeeze(-1)  # (nW, wh*ww)


def dense_window_attention(t: Tensor, info: dict[str, Any]) -> Tensor:
    """Window attention (B * nW, heads, n, n) -> (B, heads, N, N) over the stage's token grid.

    Entries between tokens of different windows are zero; attention to padding is dropped.
    """
    b = info["batch"]
    h, w = info["grid"]
    n_tok = h * w
    ids = window_ids(info).to(t.device)  # (nW, n)
    nw, n = ids.shape
    heads = t.shape[1]
    windows = t.reshape(b, nw, heads, n, n).permute(0, 2, 1, 3, 4)  # (B, heads, nW, n, n)
    dense = t.new_zeros(b, heads, n_tok + 1, n_tok + 1)  # last row/column collect padding
    dense[:, :, ids[:, :, None], ids[:, None, :]] = windows
    return dense[:, :, :n_tok, :n_tok]


class LayoutAdapter:
    """Turns a model's attention records and ``token_layout`` into :class:`AttentionLayer` / :class:`FeaturePoint`."""

    def layout(self, model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
        return model.token_layout(tuple(image_size))

    def attention_layers(self, model: nn.Module, records: Sequence[AttentionRecord],
                         image_size: tuple[int, int]) -> list[AttentionLayer]:
        """One :class:`AttentionLayer` per record the layout describes (in call order)."""
        by_name = {a.module: a for a in self.layout(model, image_size).attention}
        kept = [(r, by_name[r.name]) for r in records if r.name in by_name]  # a call the layout leaves out (e.g.
        # a later fusion block that only sees its class token) is skipped
        traces = attention_traces(model, [(r.name, tuple(r.probs.shape[-2:]), (sum(s.size for s in a.queries),
                                                                                sum(s.size for s in a.keys)))
                                          for r, a in kept])
        out = []
        for j, (r, a) in enumerate(kept):
            info, assemble = r.info, None
            if a.kind == "window":
                assemble = partial(dense_window_attention, info=r.info)
            elif traces is not None and (traces[j].query is not None or traces[j].key is not None):
                # attention over merged tokens (token merging), spread back on the laid-out tokens
                assemble = partial(expand_attention, query=traces[j].query, key=traces[j].key)
                info = {**r.info, "batch": r.probs.shape[0], "merged_tokens": tuple(r.probs.shape[-2:])}
            out.append(AttentionLayer(len(out) + 1, r.name, a.label, a.kind, a.queries, a.keys, r.probs, info,
                                      assemble))
        return out

    def feature_points(self, model: nn.Module, image_size: tuple[int, int]) -> list[FeaturePoint]:
        """One :class:`FeaturePoint` per ``forward_intermediates`` index."""
        return [FeaturePoint(f.label, model.get_submodule(f.module), f.prefix, f.grid if f.prefix is not None else None,
                             f.grid.cell, f.reaches_head, f.stream)
                for f in self.layout(model, image_size).features]

    def readout(self, model: nn.Module) -> list[SegmentKey]:
        """Segments whose (mean) final state the classifier reads."""
        return list(self.layout(model, _nominal_size(model)).readout)

    def default_queries(self, model: nn.Module) -> list[str]:
        """Prefix tokens whose attention :class:`AttentionVisualizer` shows by default."""
        return list(self.layout(model, _nominal_size(model)).default_queries)


def _nominal_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)  # type: ignore[return-value]


_ADAPTER = LayoutAdapter()


def adapter_for(model: nn.Module) -> LayoutAdapter:
    """The layout adapter of a model that follows the backbone contract; ValueError for others."""
    if not callable(getattr(model, "token_layout", None)):
        raise ValueError(
            f"{type(model).__name__} does not describe its token layout (Backbone.token_layout), so explainability "
            "cannot place its tokens on the image; use a vitlab model (vitlab.list_models())"
        )
    return _ADAPTER


def has_attention(model: nn.Module) -> bool:
    """Whether the model describes attention layers in its token layout."""
    return bool(adapter_for(model).layout(model, _nominal_size(model)).attention)


def require_attention(model: nn.Module) -> LayoutAdapter:
    """The adapter of a model with attention layers; ValueError (naming what does work) otherwise."""
    adapter = adapter_for(model)
    if not has_attention(model):
        raise ValueError(
            f"{type(model).__name__} has no attention layers: attention maps, rollout and attention analysis need "
            f"a transformer; Grad-CAM, occlusion, saliency and PCA work for it"
        )
    return adapter


def attention_layers(model: nn.Module, records: Sequence[AttentionRecord],
                     image_size: tuple[int, int]) -> list[AttentionLayer]:
    """The model's attention records as :class:`AttentionLayer` objects (see the module docstring)."""
    return require_attention(model).attention_layers(model, records, tuple(image_size))


def resolve_layers(layers: int | Sequence[int] | None, n: int, what: str = "attention layers") -> list[int]:
    """1-based layer numbers (negative: from the end) -> sorted 0-based indices; ValueError when out of range."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for k in layers:
        j = (k - 1 if k > 0 else n + k) if isinstance(k, int) and not isinstance(k, bool) else -1
        if not (k != 0 and 0 <= j < n):
            raise ValueError(f"layer {k!r} is out of range: the model has {n} {what}, numbered 1..{n} "
                             f"(or -1..-{n} from the end)")
        out.append(j)
    return sorted(set(out))

