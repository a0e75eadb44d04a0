"""Attention maps in image space, and the plots of every explanation (matplotlib, Agg backend).

:class:`AttentionVisualizer` is the planned entry point::

    viz = AttentionVisualizer(model)
    maps = viz.generate_attention_maps("cat.jpg", layers=[6, 9, 12], heads="mean")
    viz.plot_attention_maps(maps, save_to="attention.png")

It works for every vitlab transformer family (see :mod:`vitlab.evaluation.layouts` for how
each family's attention is placed on the image) and any input size. Attention is recorded
with :func:`~vitlab.components.capture_attention`, which switches the fused SDPA kernel to
the explicit path only while recording, so maps are never silently empty. A model with token
merging (ToMe) gets maps on its original patches: a merged key's attention is shared by its
patches (see :mod:`vitlab.components.tome_explain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from ..datasets.transforms import ImageLike
from .analysis import analyze_attention
from .interpretation import (
    Explanation,
    FeatureView,
    capture_layers,
    grad_cam,
    gradient_rollout,
    occlusion,
    pca_features,
    prepare_image,
    rollout,
    saliency,
)
from .layouts import AttentionLayer, TokenGrid, adapter_for, grid_to_image, require_attention, resolve_layers
from .figures import save_figure  # noqa: F401  (re-exported: vitlab.evaluation.visualization.save_figure)
from ..tasks.plots import _pyplot

Heads = Literal["mean", "max", "all"] | int
Query = str | tuple[float, float]


@dataclass
class LayerMap:
    """One layer's attention of one query, in image space.

    Attributes:
        layer: 1-based attention layer.
        label: ``block 6``, ``stage 2 block 2 (shifted windows)``, ``class-attention block 1`` ...
        query: ``cls``, ``dist``, ``mean`` (mean over patch queries) or ``token at (y, x)``.
        heads: The head reduction: ``mean``, ``max``, ``all`` or a head index.
        map: (B, H, W), or (B, heads, H, W) for ``all``: attention to each patch, spread
            over the pixels it covers.
        token_map: The same on the key grid: (B, h, w) or (B, heads, h, w).
        grid: The key grid (for PVT the reduced grid, for a CrossViT fusion the other branch's).
        prefix_attention: (B,) or (B, heads): attention to prefix tokens (not in the map).
    """

    layer: int
    label: str
    query: str
    heads: str | int
    map: Tensor
    token_map: Tensor
    grid: TokenGrid
    prefix_attention: Tensor


@dataclass
class AttentionMaps:
    """What :meth:`AttentionVisualizer.generate_attention_maps` returns.

    Attributes:
        image: (B, H, W, C) the images in [0, 1] as the model saw them (for overlays).
        maps: One :class:`LayerMap` per (layer, query), in layer order.
        logits: (B, num_classes) the model's output.
    """

    image: Tensor
    maps: list[LayerMap]
    logits: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.maps)

    def __iter__(self) -> Iterator[LayerMap]:
        return iter(self.maps)

    def layer(self, index: int) -> list[LayerMap]:
        """The maps of 1-based attention layer ``index``."""
        found = [m for m in self.maps if m.layer == index]
        if not found:
            raise KeyError(f"no map for layer {index}; these layers have maps: {sorted({m.layer for m in self.maps})}")
        return found


def _query_rows(layer: AttentionLayer, query: Query) -> tuple[str, Tensor] | None:
    """(name, rows (B, heads, N_key)) of ``query`` in a layer, or None when the layer has no such query."""
    probs = layer.probs
    grid = layer.query_grid()
    if isinstance(query, tuple):
        if grid is None:
            return None
        start = layer.offset(layer.queries, grid.key)
        return f"token at ({query[0]:g}, {query[1]:g})", probs[:, :, start + grid.grid.index_at(*query)]
    if query == "mean":
        if grid is None:
            return "mean", probs.mean(dim=2)
        start = layer.offset(layer.queries, grid.key)
        return "mean", probs[:, :, start : start + grid.size].mean(dim=2)
    for seg in layer.queries:
        if seg.key[0] == query and not seg.is_grid:
            return query, probs[:, :, layer.offset(layer.queries, seg.key)]
    return None


def attention_map(layer: AttentionLayer, query: Query, heads: Heads, image_size: tuple[int, int],
                  interpolation: str = "bilinear") -> LayerMap | None:
    """One layer's attention for ``query`` as a :class:`LayerMap` (None when the layer lacks the query)."""
    sel = _query_rows(layer, query)
    if sel is None:
        return None
    name, rows = sel
    keys = layer.key_grid()
    start = layer.offset(layer.keys, keys.key)
    b, h = rows.shape[:2]
    token = rows[:, :, start : start + keys.size].reshape(b, h, *keys.grid.shape)  # (B, heads, h, w)
    prefix = rows.sum(dim=-1) - token.flatten(2).sum(dim=-1)  # (B, heads)
    if heads == "mean":
        token, prefix = token.mean(dim=1), prefix.mean(dim=1)
    elif heads == "max":
        token, prefix = token.amax(dim=1), prefix.amax(dim=1)
    elif isinstance(heads, int) and not isinstance(heads, bool):
        if not 0 <= heads < h:
            raise ValueError(f"head {heads} is out of range: {layer.label} has {h} heads (0..{h - 1})")
        token, prefix = token[:, heads], prefix[:, heads]
    elif heads != "all":
        raise ValueError(f"heads must be 'mean', 'max', 'all' or a head index, got {heads!r}")
    image = grid_to_image(token, keys.grid, image_size, interpolation)
    return LayerMap(layer.index, layer.label, name, heads, image, token, keys.grid, prefix)


class AttentionVisualizer:
    """Attention maps, rollout, Grad-CAM, occlusion, saliency and PCA for one vitlab model.

    Args:
        model: Any vitlab model (attention methods need a transformer; the others also
            work for the CNN).
        interpolation: How token grids are spread over pixels: ``"bilinear"`` or
            ``"nearest"`` (one flat block per token).

    Example:
        >>> viz = AttentionVisualizer(model)
        >>> maps = viz.generate_attention_maps(image, layers=[6, 9, 12], heads="mean")
        >>> viz.plot_attention_maps(maps, save_to="attention.png")
    """

    def __init__(self, model: nn.Module, interpolation: str = "bilinear") -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.interpolation = interpolation

    # -------------------------------------------------------------- attention
    def attention_layers(self, image: ImageLike | Tensor) -> list[AttentionLayer]:
        """Every attention layer of the model on ``image`` (see :class:`~vitlab.evaluation.layouts.AttentionLayer`)."""
        x, _ = prepare_image(self.model, image)
        return capture_layers(self.model, x)[0]

    def generate_attention_maps(
        self,
        image: ImageLike | Tensor,
        layers: int | Sequence[int] | None = None,
        heads: Heads = "mean",
        query: Query = "auto",
    ) -> AttentionMaps:
        """Per-layer attention maps in image space.

        Args:
            image: A path, PIL image, array, or a prepared float tensor (see
                :func:`~vitlab.evaluation.interpretation.prepare_image`).
            layers: 1-based attention layers in call order (``[6, 9, 12]`` for a 12-block
                ViT; negative counts from the end); all by default. For CaiT the class-attention
                blocks follow the self-attention blocks; for CrossViT both branches' blocks and
                the fusions are numbered in the order they run.
            heads: ``"mean"``, ``"max"``, a head index, or ``"all"`` (one map per head).
            query: Whose attention: ``"auto"`` (the tokens the classifier reads: class
                token, DeiT's class and distillation tokens, CrossViT's branch class tokens;
                the mean over patch queries where there is none), ``"cls"``, ``"dist"``,
                ``"mean"``, or a pixel ``(y, x)``: the patch token covering it.

        Raises:
            ValueError: A model without attention, a layer out of range (the message gives
                the valid range), a bad head, or a query no requested layer has.
        """
        require_attention(self.model)
        x, display = prepare_image(self.model, image)
        all_layers, logits = capture_layers(self.model, x)
        chosen = resolve_layers(layers, len(all_layers))
        defaults = self.adapter.default_queries(self.model)
        out = []
        for j in chosen:
            layer = all_layers[j]
            names: list[Query] = [query]
            if query == "auto":
                names = [q for q in defaults if q in layer.query_names()] or ["mean"]
            for q in names:
                m = attention_map(layer, q, heads, tuple(x.shape[-2:]), self.interpolation)
                if m is None and layers is not None:
                    have = [la.index for la in all_layers if _query_rows(la, q) is not None]
                    raise ValueError(f"{layer.label} (layer {layer.index}) has no {q!r} query; layers that do: {have}")
                if m is not None:
                    out.append(m)
        if not out:
            raise ValueError(f"no attention layer of this model has a {query!r} query")
        return AttentionMaps(display, out, logits, dict(heads=heads, query=query, num_layers=len(all_layers)))

    def plot_attention_maps(self, maps: AttentionMaps, save_to: str | Path | None = None, index: int = 0,
                            alpha: float = 0.5, cmap: str = "jet") -> Any:
        """Overlay the maps on the image: one panel per layer (a row per layer for ``heads="all"``).

        Args:
            maps: From :meth:`generate_attention_maps`.
            save_to: PNG path to write (the figure is returned either way).
            index: Which image of the batch.
        """
        return plot_attention_maps(maps, save_to, index, alpha, cmap)

    # -------------------------------------------------------------- other methods
    def rollout(self, image: ImageLike | Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0) -> Explanation:
        """Attention rollout (see :func:`~vitlab.evaluation.interpretation.rollout`)."""
        return rollout(self.model, prepare_image(self.model, image)[0], head_fusion, discard_ratio, self.interpolation)

    def gradient_rollout(self, image: ImageLike | Tensor, target: int | None = None,
                         discard_ratio: float = 0.0) -> Explanation:
        """Class-specific rollout (see :func:`~vitlab.evaluation.interpretation.gradient_rollout`)."""
        return gradient_rollout(self.model, prepare_image(self.model, image)[0], target, discard_ratio,
                                self.interpolation)

    def grad_cam(self, image: ImageLike | Tensor, target: int | None = None,
                 layer: int | Sequence[int] | None = None) -> Explanation:
        """Grad-CAM (see :func:`~vitlab.evaluation.interpretation.grad_cam`)."""
        return grad_cam(self.model, prepare_image(self.model, image)[0], target, layer, self.interpolation)

    def occlusion(self, image: ImageLike | Tensor, target: int | None = None, **kwargs: Any) -> Explanation:
        """Occlusion sensitivity (see :func:`~vitlab.evaluation.interpretation.occlusion`)."""
        return occlusion(self.model, prepare_image(self.model, image)[0], target, **kwargs)

    def saliency(self, image: ImageLike | Tensor, target: int | None = None, **kwargs: Any) -> Explanation:
        """Input-gradient saliency (see :func:`~vitlab.evaluation.interpretation.saliency`)."""
        return saliency(self.model, prepare_image(self.model, image)[0], target, **kwargs)

    def pca(self, image: ImageLike | Tensor, layers: int | Sequence[int] | None = None) -> list[FeatureView]:
        """PCA of patch tokens to RGB (see :func:`~vitlab.evaluation.interpretation.pca_features`)."""
        return pca_features(self.model, prepare_image(self.model, image)[0], layers)

    def analyze(self, image: ImageLike | Tensor) -> dict[str, Any]:
        """Mean attention distance, entropy and head roles per layer (see
        :func:`~vitlab.evaluation.analysis.analyze_attention`)."""
        return analyze_attention(self.attention_layers(image))


# ---------------------------------------------------------------------------------- plots
Panel = tuple[str, Tensor | None]  # (title, heat map (H, W) / RGB (H, W, 3), or None for the image alone)


def _normalise(m: Tensor) -> Tensor:
    m = m.detach().float().cpu()
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def _draw(ax: Any, image: Tensor, heat: Tensor | None, title: str, alpha: float, cmap: str) -> None:
    img = image.detach().float().cpu()
    if heat is not None and heat.ndim == 3:  # an RGB rendering (PCA): shown as it is
        ax.imshow(heat.detach().float().cpu().clamp(0, 1).numpy(), interpolation="nearest")
    else:
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.clamp(0, 1).numpy())
        if heat is not None:
            ax.imshow(_normalise(heat).numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_sheet(image: Tensor, rows: Sequence[tuple[str, Sequence[Panel]]], save_to: str | Path | None = None,
               alpha: float = 0.5, cmap: str = "jet", title: str | None = None) -> Any:
    """A grid of panels over one image: a row per entry of ``rows`` (row title, panels).

    Args:
        image: (H, W, C) in [0, 1].
        rows: ``[(row title, [(panel title, heat (H, W) | RGB (H, W, 3) | None), ...]), ...]``.
        save_to: PNG path to write.

    Returns:
        The matplotlib figure (closed when saved).
    """
    plt = _pyplot()
    ncols = max(len(panels) for _, panels in rows)
    nrows = len(rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.6 * nrows), squeeze=False)
    for r, (row_title, panels) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(panels):
                ax.axis("off")
                continue
            name, heat = panels[c]
            _draw(ax, image, heat, f"{row_title}: {name}" if row_title and c == 0 else name, alpha, cmap)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


def plot_attention_maps(maps: AttentionMaps, save_to: str | Path | None = None, index: int = 0,
                        alpha: float = 0.5, cmap: str = "jet") -> Any:
    """Overlay :class:`AttentionMaps` on their image (see :meth:`AttentionVisualizer.plot_attention_maps`)."""
    if not 0 <= index < maps.image.shape[0]:
        raise ValueError(f"index {index} is out of range for a batch of {maps.image.shape[0]} images")
    image = maps.image[index]
    if maps.maps and maps.maps[0].map.ndim == 4:  # heads="all": a row per layer, a panel per head
        rows = [(f"L{m.layer} {m.query}", [("image", None)] + [(f"head {h}", m.map[index, h])
                                                                for h in range(m.map.shape[1])])
                for m in maps.maps]
    else:
        panels: list[Panel] = [("image", None)]
        panels += [(f"L{m.layer} {m.query}\n{m.label}", m.map[index]) for m in maps.maps]
        per_row = 6
        rows = [("", panels[i : i + per_row]) for i in range(0, len(panels), per_row)]
    return plot_sheet(image, rows, save_to, alpha, cmap)
