"""CLIP figures: the image-text similarity heat map."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import Tensor


def plot_similarity(sim: Tensor, captions: Sequence[str], path: str | Path) -> Path:
    """Heat map of image (rows) x caption (columns) cosine similarities, written to ``path``."""
    from ..plots import _pyplot

    plt = _pyplot()
    n = sim.shape[0]
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n))
    im = ax.imshow(sim.float().numpy(), cmap="viridis")
    ax.set_xticks(range(n), [c[:28] for c in captions], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [f"image {i}" for i in range(n)], fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(sim[i, j]):.2f}", ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("image-text cosine similarity (fixed eval batch)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_similarity"]
