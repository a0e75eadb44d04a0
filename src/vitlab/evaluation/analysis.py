"""Attention analysis: mean attention distance, entropy and head specialisation, per layer and head.

* Mean attention distance (Dosovitskiy et al., 2021, fig. 7): for each patch query, the
  distance in input pixels between its patch centre and each key's patch centre, weighted by
  the attention (renormalised over patch keys; prefix tokens have no position), averaged
  over queries and images. PVT keys sit at the centres of their reduced cells, Swin keys
  only within the window, CrossViT distances in each branch's own (resized) patch size.
* Entropy (nats) of each query's attention distribution, averaged; also normalised by
  ``log(number of keys it can reach)`` (the window for Swin; 1 = uniform).
* Head specialisation: each head's distance relative to what uniform attention over the
  same keys would give (``local`` < 0.5 <= ``mixed`` < 0.85 <= ``global``), its attention to
  prefix tokens, and how similar the heads of a layer are (mean pairwise cosine similarity
  of their attention matrices; 1 = redundant heads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .figures import save_figure
from .layouts import AttentionLayer
from ..tasks.plots import _pyplot

LOCAL, GLOBAL = 0.5, 0.85


def mean_attention_distance(probs: Tensor, query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Attention-weighted distance per head, (heads,).

    Args:
        probs: (B, heads, Nq, Nk) attention of ``Nq`` positioned queries over ``Nk`` positioned
            keys; rows are renormalised to sum to 1 (rows with no mass are left out).
        query_pos: (Nq, 2) query positions (pixels).
        key_pos: (Nk, 2) key positions (pixels).
    """
    dist = torch.cdist(query_pos.float(), key_pos.float())  # (Nq, Nk)
    p = probs.float()
    mass = p.sum(dim=-1)  # (B, heads, Nq)
    per_row = (p * dist.to(p.device)).sum(dim=-1) / mass.clamp(min=1e-12)
    valid = (mass > 1e-12).float()
    return (per_row * valid).sum(dim=(0, 2)) / valid.sum(dim=(0, 2)).clamp(min=1)


def attention_entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the attention rows, per head: (B, heads, Nq, Nk) -> (heads,)."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1).mean(dim=(0, 2))


def head_similarity(probs: Tensor) -> float | None:
    """Mean pairwise cosine similarity of the heads' attention matrices (None for one head)."""
    h = probs.shape[1]
    if h < 2:
        return None
    flat = probs.float().transpose(0, 1).reshape(h, -1)  # (heads, B * Nq * Nk)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = flat @ flat.T
    return float((sim.sum() - sim.diagonal().sum()) / (h * (h - 1)))


def _role(relative: float | None, prefix: float) -> str:
    if prefix > 0.5:
        return "prefix"
    if relative is None:
        return "n/a"
    return "local" if relative < LOCAL else ("global" if relative >= GLOBAL else "mixed")


def layer_statistics(layer: AttentionLayer) -> dict[str, Any]:
    """Distance, entropy, prefix attention, similarity and roles of one layer's heads."""
    probs = layer.probs
    qs, ks = layer.query_grid(), layer.key_grid()
    kstart = layer.offset(layer.keys, ks.key)
    entropy = attention_entropy(probs)
    # keys a query can reach: its window for window attention, else every key
    n_keys = math.prod(layer.info["window"]) if layer.kind == "window" else probs.shape[-1]
    prefix = (probs.sum(dim=-1) - probs[..., kstart : kstart + ks.size].sum(dim=-1)).mean(dim=(0, 2))
    distance = relative = None
    if qs is not None:
        qstart = layer.offset(layer.queries, qs.key)
        p = probs[:, :, qstart : qstart + qs.size, kstart : kstart + ks.size]
        qpos, kpos = qs.grid.centers(), ks.grid.centers()
        distance = mean_attention_distance(p, qpos, kpos)
        uniform = torch.cdist(qpos, kpos).mean()
        relative = (distance / uniform.clamp(min=1e-12)).tolist()
        distance = distance.tolist()
    roles = [_role(None if relative is None else relative[h], float(prefix[h])) for h in range(probs.shape[1])]
    return dict(
        layer=layer.index, label=layer.label, kind=layer.kind, heads=probs.shape[1], keys=n_keys,
        mean_distance_px=distance, relative_distance=relative, entropy=entropy.tolist(),
        normalized_entropy=(entropy / math.log(n_keys)).tolist() if n_keys > 1 else [0.0] * probs.shape[1],
        prefix_attention=prefix.tolist(), head_similarity=head_similarity(probs), roles=roles,
    )


def analyze_attention(layers: Sequence[AttentionLayer]) -> dict[str, Any]:
    """Statistics of every layer and a head-specialisation summary (JSON-ready).

    Returns:
        ``{"layers": [layer_statistics ...], "summary": {...}}``; the summary counts head roles
        and gives the mean distance and entropy per layer, the layer with the most similar
        heads and the layer with the most diverse ones.
    """
    stats = [layer_statistics(layer) for layer in layers]
    roles: dict[str, int] = {}
    for s in stats:
        for r in s["roles"]:
            roles[r] = roles.get(r, 0) + 1
    similar = [(s["head_similarity"], s["layer"]) for s in stats if s["head_similarity"] is not None]
    summary = dict(
        num_layers=len(stats),
        num_heads=sum(s["heads"] for s in stats),
        roles=roles,
        mean_distance_by_layer=[None if s["mean_distance_px"] is None else sum(s["mean_distance_px"]) / s["heads"]
                                for s in stats],
        mean_entropy_by_layer=[sum(s["entropy"]) / s["heads"] for s in stats],
        most_redundant_layer=max(similar)[1] if similar else None,
        most_diverse_layer=min(similar)[1] if similar else None,
    )
    return dict(layers=stats, summary=summary)


def save_json(data: Any, path: str | Path) -> Path:
    """Write JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def plot_attention_analysis(analysis: dict[str, Any], save_to: str | Path | None = None) -> Any:
    """Mean attention distance per head against depth (as in the ViT paper) and entropy per head.

    Returns the matplotlib figure (written as PNG to ``save_to`` when given).
    """
    plt = _pyplot()
    stats = analysis["layers"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in stats:
        if s["mean_distance_px"] is not None:
            ax1.scatter([s["layer"]] * s["heads"], s["mean_distance_px"], s=14)
    ax1.set_xlabel("attention layer")
    ax1.set_ylabel("mean attention distance (pixels)")
    ax1.set_title("mean attention distance per head")
    width = max(s["heads"] for s in stats)
    grid = torch.full((len(stats), width), float("nan"))
    for i, s in enumerate(stats):
        grid[i, : s["heads"]] = torch.tensor(s["normalized_entropy"])
    im = ax2.imshow(grid.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                    extent=(0.5, len(stats) + 0.5, -0.5, width - 0.5))
    fig.colorbar(im, ax=ax2, label="entropy / log(keys)")
    ax2.set_xlabel("attention layer")
    ax2.set_yticks(range(width))
    ax2.set_ylabel("head")
    ax2.set_title("normalised attention entropy")
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig
