"""CLIP figures: the image-text similarity heat map."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor


#: Characters per line of a wrapped caption tick label.
CAPTION_WIDTH = 24


def similarity_figure(sim: Tensor, captions: Sequence[str]) -> Any:
    """The matplotlib figure of :func:`plot_similarity` (not saved, not closed).

    Every caption is shown whole, wrapped at :data:`CAPTION_WIDTH` characters; the figure
    grows with the longest one so that the rotated labels fit inside it.
    """
    from ..plots import _pyplot

    plt = _pyplot()
    n = sim.shape[0]
    wrapped = [textwrap.fill(str(c), CAPTION_WIDTH, break_long_words=True) or " " for c in captions]
    lines = max((w.count("\n") + 1 for w in wrapped), default=1)
    chars = max((len(line) for w in wrapped for line in w.splitlines()), default=1)
    # a 7-pt character is about 0.06 in wide, a line about 0.12 in high; at 60 degrees the label
    # takes sin(60) of its length downwards and about half of it leftwards
    label_h = 0.87 * 0.06 * chars + 0.5 * 0.12 * lines
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * n + 0.5 * 0.06 * chars, 1.5 + 0.5 * n + label_h))
    im = ax.imshow(sim.float().numpy(), cmap="viridis")
    ax.set_xticks(range(n), wrapped, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_yticks(range(n), [f"image {i}" for i in range(n)], fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(sim[i, j]):.2f}", ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("image-text cosine similarity (fixed eval batch)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_similarity(sim: Tensor, captions: Sequence[str], path: str | Path) -> Path:
    """Heat map of image (rows) x caption (columns) cosine similarities, written to ``path``.

    Captions are shown whole (wrapped), inside the figure.
    """
    from ..plots import _pyplot

    fig = similarity_figure(sim, captions)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


__all__ = ["CAPTION_WIDTH", "plot_similarity", "similarity_figure"]
