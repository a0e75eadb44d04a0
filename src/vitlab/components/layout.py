"""How a backbone's tokens lie on the image: the data of ``Backbone.token_layout``.

A model describes its token layout once (prefix tokens, token grids in input pixels, the
attention layers' query and key sequences, windows and their shift, reduced key grids,
the places whose output is a feature map); explainability works on this description only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SegmentKey = tuple[str, int]  # ("cls" | "dist" | "grid", stream); a stream is e.g. a CrossViT branch (else 0)


@dataclass(frozen=True)
class TokenGrid:
    """A raster of tokens laid over the image.

    Attributes:
        shape: (rows, columns) of tokens.
        cell: Height and width in input pixels that one token covers (may be fractional,
            e.g. a CrossViT branch that sees a resized image). Token (i, j) covers rows
            ``[i * cell_h, (i + 1) * cell_h)``; the grid may extend past the image (padding).
    """

    shape: tuple[int, int]
    cell: tuple[float, float]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def centers(self, device: torch.device | None = None) -> Tensor:
        """Pixel centres (y, x) of the tokens in raster order, (h * w, 2)."""
        ys = (torch.arange(self.shape[0], device=device, dtype=torch.float32) + 0.5) * self.cell[0]
        xs = (torch.arange(self.shape[1], device=device, dtype=torch.float32) + 0.5) * self.cell[1]
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # (h, w, 2) -> (h*w, 2)

    def index_at(self, y: float, x: float) -> int:
        """Raster index of the token covering pixel (y, x) (clamped to the grid)."""
        i = min(max(int(y // self.cell[0]), 0), self.shape[0] - 1)
        j = min(max(int(x // self.cell[1]), 0), self.shape[1] - 1)
        return i * self.shape[1] + j


@dataclass(frozen=True)
class Segment:
    """A run of tokens in a query or key sequence: one prefix token, or a grid of patch tokens."""

    key: SegmentKey
    grid: TokenGrid | None = None

    @property
    def size(self) -> int:
        return 1 if self.grid is None else self.grid.size

    @property
    def is_grid(self) -> bool:
        return self.grid is not None


def square_cell(cell: float) -> tuple[float, float]:
    """A square token cell of side ``cell`` pixels."""
    return float(cell), float(cell)


@dataclass(frozen=True)
class AttentionLayout:
    """One attention module's call, in image terms.

    Attributes:
        module: Name of the attention module (``blocks.5.attn``), as ``named_modules`` gives it.
        label: Human description (``block 6``, ``stage 2 block 2 (shifted windows)``).
        kind: ``self``, ``window``, ``spatial-reduction``, ``class`` or ``cross``.
        queries: Segments of the query sequence, in order.
        keys: Segments of the key sequence, in order.
        window: Attention window (window attention), else None.
        shift: Cyclic shift of the windows (window attention), else None.
    """

    module: str
    label: str
    kind: str
    queries: tuple[Segment, ...]
    keys: tuple[Segment, ...]
    window: tuple[int, int] | None = None
    shift: tuple[int, int] | None = None

    @property
    def num_queries(self) -> int:
        return sum(s.size for s in self.queries)

    @property
    def num_keys(self) -> int:
        return sum(s.size for s in self.keys)


@dataclass(frozen=True)
class FeatureLayout:
    """Where ``forward_intermediates``' map ``index`` lies on the image.

    Attributes:
        label: Human description (``block 11``, ``stage 4``, ``branch 0 stage 3``).
        grid: The map's grid (shape and input pixels per position).
        module: The module whose output carries these tokens (the last block of the stage).
        prefix: Prefix tokens before the grid tokens in that module's output; None when the
            output is already a (B, C, H, W) map.
        reaches_head: False when the grid tokens here cannot influence the logits (the last
            block of a class-token-pooled model), so their gradient is zero.
        stream: Which token stream the map belongs to (a CrossViT branch; else 0).
    """

    label: str
    grid: TokenGrid
    module: str
    prefix: int | None = 0
    reaches_head: bool = True
    stream: int = 0


@dataclass(frozen=True)
class TokenLayout:
    """A backbone's whole token layout at one input size (``Backbone.token_layout``).

    Attributes:
        attention: Every attention call of one forward, in call order (empty: no attention).
        features: One entry per ``forward_intermediates`` index.
        readout: Segments whose (mean) final state the classifier reads.
        default_queries: Prefix tokens whose attention is shown by default.
    """

    attention: tuple[AttentionLayout, ...]
    features: tuple[FeatureLayout, ...]
    readout: tuple[SegmentKey, ...]
    default_queries: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


__all__ = ["AttentionLayout", "FeatureLayout", "Segment", "SegmentKey", "TokenGrid", "TokenLayout", "square_cell"]
