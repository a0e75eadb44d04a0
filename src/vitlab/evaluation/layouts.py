"""Where every family's tokens lie on the image: one small adapter per model family.

Explainability needs to know, for each attention call, which tokens asked (queries) and
which answered (keys), and where on the image each of them sits. vitlab's
:func:`~vitlab.components.capture_attention` records the probabilities with what the module
knew (``AttentionRecord.info``); the adapters here add what only the model knows (patch
size, stage strides, prefix tokens) and hand back one uniform description,
:class:`AttentionLayer`, that every method in :mod:`vitlab.evaluation` works on:

* ``vit`` / ``deit``: self-attention over [class (, distillation) token, patch grid].
* ``cait``: talking-heads self-attention over the patch grid, then class attention (the class
  token's query over [class token, patch grid]).
* ``swin``: window attention assembled back into one (N, N) matrix per block over the stage's
  token grid, the cyclic shift undone and padding dropped (zero outside a token's window).
* ``pvt`` / ``pvt_v2``: spatial-reduction attention; keys lie on the reduced grid (cells
  ``sr`` times larger, or the 7x7 pooled grid of the linear variant).
* ``crossvit``: self-attention per branch, each branch's grid at its own (fractional) stride in
  input pixels, and the fusion's cross-attention (a branch's class token over the other
  branch's tokens).

Token grids are described in input-image pixels (:class:`TokenGrid`), so maps of any layer,
stage or branch land on the image whatever its size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import AttentionRecord, window_partition

SegmentKey = tuple[str, int]  # ("cls" | "dist" | "grid", stream); a stream is a CrossViT branch (else 0)


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
        assemble: Turns ``source`` into :attr:`probs` (window attention); None when it is already.
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
        (N, N) matrices of all blocks together would not fit in memory.
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
    """

    label: str
    module: nn.Module
    prefix: int | None
    grid: TokenGrid | None
    cell: tuple[float, float]
    reaches_head: bool = True


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


# ------------------------------------------------------------------------------ adapters
def _stage_of(model: nn.Module, name: str) -> int:
    """Index of the ``feature_info`` entry whose module contains module ``name``."""
    for i, fi in enumerate(model.feature_info):
        if name.startswith(fi["module"] + "."):
            return i
    raise ValueError(f"cannot place attention module {name!r} in a stage of {type(model).__name__}")


def _square(cell: float | int) -> tuple[float, float]:
    return float(cell), float(cell)


class FamilyAdapter:
    """Turns a family's attention records and blocks into :class:`AttentionLayer` / :class:`FeaturePoint`."""

    def attention_layers(self, model: nn.Module, records: Sequence[AttentionRecord],
                         image_size: tuple[int, int]) -> list[AttentionLayer]:
        raise NotImplementedError

    def feature_points(self, model: nn.Module, image_size: tuple[int, int]) -> list[FeaturePoint]:
        raise NotImplementedError

    def readout(self, model: nn.Module) -> list[SegmentKey]:
        """Segments whose (mean) final state the classifier reads."""
        raise NotImplementedError

    def default_queries(self, model: nn.Module) -> list[str]:
        """Prefix tokens whose attention :class:`AttentionVisualizer` shows by default."""
        return [k[0] for k in self.readout(model) if k[0] != "grid"]


class ViTAdapter(FamilyAdapter):
    """ViT and DeiT: [class (, distillation) token, patches] through every block."""

    def prefixes(self, model: nn.Module) -> list[Segment]:
        names = (["cls"] if getattr(model, "cls_token", None) is not None else [])
        names += ["dist"] * int(getattr(model, "num_distill_tokens", 0))
        return [Segment((n, 0)) for n in names]

    def grid(self, model: nn.Module, image_size: tuple[int, int]) -> TokenGrid:
        pe = model.patch_embed
        return TokenGrid(pe.grid_size(image_size), (float(pe.stride[0]), float(pe.stride[1])))

    def attention_layers(self, model, records, image_size):
        segs = (*self.prefixes(model), Segment(("grid", 0), self.grid(model, image_size)))
        return [AttentionLayer(i + 1, r.name, f"block {i + 1}", "self", segs, segs, r.probs, r.info)
                for i, r in enumerate(records)]

    def readout(self, model):
        if model.config.pool == "mean":
            return [("grid", 0)]
        return [s.key for s in self.prefixes(model)]

    def feature_points(self, model, image_size):
        grid = self.grid(model, image_size)
        prefix = len(self.prefixes(model))
        last_blind = model.config.pool == "cls"
        n = len(model.blocks)
        return [FeaturePoint(f"block {i + 1}", blk, prefix, grid, grid.cell, not (last_blind and i == n - 1))
                for i, blk in enumerate(model.blocks)]


class CaiTAdapter(ViTAdapter):
    """CaiT: self-attention over the patches only, then class attention of the class token."""

    def attention_layers(self, model, records, image_size):
        grid = Segment(("grid", 0), self.grid(model, image_size))
        cls = Segment(("cls", 0))
        out = []
        for r in records:
            i = len(out) + 1
            if r.info.get("query") == "class_token":
                j = i - len(model.blocks)
                out.append(AttentionLayer(i, r.name, f"class-attention block {j}", "class", (cls,), (cls, grid),
                                          r.probs, r.info))
            else:
                out.append(AttentionLayer(i, r.name, f"block {i}", "self", (grid,), (grid,), r.probs, r.info))
        return out

    def readout(self, model):
        return [("grid", 0)] if model.config.pool == "mean" else [("cls", 0)]

    def default_queries(self, model):
        return ["cls"]

    def feature_points(self, model, image_size):
        grid = self.grid(model, image_size)
        return [FeaturePoint(f"block {i + 1}", blk, 0, grid, grid.cell) for i, blk in enumerate(model.blocks)]


def swin_window_ids(info: dict[str, Any]) -> Tensor:
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


def swin_dense_attention(t: Tensor, info: dict[str, Any]) -> Tensor:
    """Window attention (B * nW, heads, n, n) -> (B, heads, N, N) over the stage's token grid.

    Entries between tokens of different windows are zero; attention to padding is dropped.
    """
    b = info["batch"]
    h, w = info["grid"]
    n_tok = h * w
    ids = swin_window_ids(info).to(t.device)  # (nW, n)
    nw, n = ids.shape
    heads = t.shape[1]
    windows = t.reshape(b, nw, heads, n, n).permute(0, 2, 1, 3, 4)  # (B, heads, nW, n, n)
    dense = t.new_zeros(b, heads, n_tok + 1, n_tok + 1)  # last row/column collect padding
    dense[:, :, ids[:, :, None], ids[:, None, :]] = windows
    return dense[:, :, :n_tok, :n_tok]


class SwinAdapter(FamilyAdapter):
    """Swin: window attention per block, re-assembled on each stage's grid; global average read-out."""

    def attention_layers(self, model, records, image_size):
        out = []
        for r in records:
            s = _stage_of(model, r.name)
            j = int(r.name.split(".")[3])
            grid = Segment(("grid", 0), TokenGrid(tuple(r.info["grid"]), _square(model.feature_info[s]["reduction"])))
            shifted = " (shifted windows)" if any(r.info["shift"]) else ""
            out.append(AttentionLayer(len(out) + 1, r.name, f"stage {s + 1} block {j + 1}{shifted}", "window",
                                      (grid,), (grid,), r.probs, r.info, partial(swin_dense_attention, info=r.info)))
        return out

    def readout(self, model):
        return [("grid", 0)]

    def feature_points(self, model, image_size):
        return [FeaturePoint(f"stage {s + 1}", stage.blocks[-1], 0, None, _square(model.feature_info[s]["reduction"]))
                for s, stage in enumerate(model.layers)]


class PvtAdapter(FamilyAdapter):
    """PVT v1/v2: spatial-reduction attention; keys on the reduced grid. v1's last stage has a class token."""

    def attention_layers(self, model, records, image_size):
        out = []
        for r in records:
            s = _stage_of(model, r.name)
            j = int(re.findall(r"\d+", r.name)[-1])
            stride = model.feature_info[s]["reduction"]
            q = TokenGrid(tuple(r.info["grid"]), _square(stride))
            kg = tuple(r.info["key_grid"])
            if r.info["reduction"] == "pool":  # the whole grid pooled to kg
                kcell = (q.shape[0] * stride / kg[0], q.shape[1] * stride / kg[1])
            elif r.info["reduction"] == "conv":
                kcell = _square(stride * r.info["sr_ratio"])
            else:
                kcell = q.cell
            prefix = (Segment(("cls", 0)),) * int(r.info["num_prefix_tokens"])
            queries = (*prefix, Segment(("grid", 0), q))
            keys = (*prefix, Segment(("grid", 0), TokenGrid(kg, kcell)))
            sr = f" (keys on a {kg[0]}x{kg[1]} reduced grid)" if r.info["reduction"] != "none" else ""
            out.append(AttentionLayer(len(out) + 1, r.name, f"stage {s + 1} block {j + 1}{sr}", "spatial-reduction",
                                      queries, keys, r.probs, r.info))
        return out

    def readout(self, model):
        return [("cls", 0)] if model.family == "pvt" else [("grid", 0)]

    def default_queries(self, model):
        return []  # the class token joins only in v1's last stage: the mean query everywhere

    def feature_points(self, model, image_size):
        n = len(model.feature_info)
        pts = []
        for s in range(n):
            if model.family == "pvt":
                blk, prefix = model.stage_blocks(s)[-1], (1 if s == n - 1 else 0)
            else:
                blk, prefix = model.stages[s].blocks[-1], 0
            cell = _square(model.feature_info[s]["reduction"])
            pts.append(FeaturePoint(f"stage {s + 1}", blk, prefix, None, cell, reaches_head=prefix == 0))
        return pts


class CrossViTAdapter(FamilyAdapter):
    """CrossViT: two branches (streams 0 and 1), each on its own grid; fusion by cross-attention."""

    @staticmethod
    def _grid(info: dict[str, Any], image_size: tuple[int, int]) -> TokenGrid:
        # The branch saw the image resized to info["image_size"]; its patches in input pixels:
        p = info["patch_size"]
        rh, rw = info["image_size"]
        return TokenGrid(tuple(info["grid"]), (p * image_size[0] / rh, p * image_size[1] / rw))

    def attention_layers(self, model, records, image_size):
        out = []
        for r in records:
            info = r.info
            if info.get("grid") is None:
                continue  # a later fusion block whose only key is the class token itself
            s = int(r.name.split(".")[1])
            b = info["branch"]
            cls = Segment(("cls", b))
            if info["kind"] == "self":
                k = int(r.name.split(".")[4])
                grid = Segment(("grid", b), self._grid(info, image_size))
                out.append(AttentionLayer(len(out) + 1, r.name, f"stage {s + 1} branch {b} block {k + 1}", "self",
                                          (cls, grid), (cls, grid), r.probs, info))
            else:
                o = info["key_branch"]
                grid = Segment(("grid", o), self._grid(info, image_size))
                out.append(AttentionLayer(len(out) + 1, r.name,
                                          f"stage {s + 1} fusion: branch {b} class token -> branch {o} tokens",
                                          "cross", (cls,), (cls, grid), r.probs, info))
        return out

    def readout(self, model):
        if model.config.pool == "mean":
            return [("grid", b) for b in range(model.num_branches)]
        return [("cls", b) for b in range(model.num_branches)]

    def default_queries(self, model):
        return ["cls"]

    def feature_points(self, model, image_size):
        from ..models.crossvit import scaled_size

        pts = []
        for b in range(model.num_branches):
            rh, rw = scaled_size(tuple(image_size), model.config.img_scale[b])
            pe = model.patch_embed[b]
            grid_shape = pe.grid_size((rh, rw))
            p = model.config.patch_size[b]
            grid = TokenGrid(grid_shape, (p * image_size[0] / rh, p * image_size[1] / rw))
            for s, stage in enumerate(model.blocks):
                pts.append(FeaturePoint(f"branch {b} stage {s + 1}", stage.blocks[b][-1], 1, grid, grid.cell))
        return pts


class ConvNetAdapter(FamilyAdapter):
    """Convolutional networks: no attention; feature maps at the end of every stage."""

    def attention_layers(self, model, records, image_size):
        raise ValueError(f"{type(model).__name__} has no attention; use gradcam, occlusion, saliency or pca")

    def feature_points(self, model, image_size):
        return [FeaturePoint(f"stage {s + 1}", model.blocks[end], None, None,
                             _square(model.feature_info[s]["reduction"]))
                for s, end in enumerate(model.stage_ends)]

    def readout(self, model):
        return []


ADAPTERS: dict[str, FamilyAdapter] = {
    "vit": ViTAdapter(),
    "deit": ViTAdapter(),
    "cait": CaiTAdapter(),
    "swin": SwinAdapter(),
    "pvt": PvtAdapter(),
    "pvt_v2": PvtAdapter(),
    "crossvit": CrossViTAdapter(),
    "convnet": ConvNetAdapter(),
}

ATTENTION_FAMILIES = tuple(k for k in ADAPTERS if k != "convnet")


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of ``model``'s family; ValueError for models vitlab cannot place."""
    family = getattr(model, "family", None)
    if family not in ADAPTERS:
        raise ValueError(
            f"{type(model).__name__} (family {family!r}) is not a vitlab model family that explainability knows; "
            f"supported: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[family]


def require_attention(model: nn.Module) -> FamilyAdapter:
    """The adapter of a model with attention layers; ValueError (naming what does work) otherwise."""
    adapter = adapter_for(model)
    family = getattr(model, "family", None)
    if family not in ATTENTION_FAMILIES:
        raise ValueError(
            f"{type(model).__name__} (family {family!r}) has no attention layers: attention maps, rollout and "
            f"attention analysis need a transformer ({', '.join(ATTENTION_FAMILIES)}); Grad-CAM, occlusion, "
            f"saliency and PCA work for it"
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

