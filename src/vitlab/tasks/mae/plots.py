"""MAE figures: reconstruction grids and loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor


def save_reconstruction_grid(grid: Tensor, path: Path, scale: int = 4) -> Path:
    """Write a (3, K, C, H, W) grid in [0, 1] as a PNG: rows original / masked / reconstruction."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reconstruction grids need Pillow: pip install pillow") from None
    rows, k, c, h, w = grid.shape
    pad = 2
    canvas = torch.ones(c, rows * (h + pad) + pad, k * (w + pad) + pad)
    for r in range(rows):
        for i in range(k):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            canvas[:, y:y + h, x:x + w] = grid[r, i]
    img = (canvas * 255).round().to(torch.uint8)
    img = img[0] if c == 1 else img.permute(1, 2, 0)  # (C, H, W) -> (H, W) or (H, W, C)
    pil = Image.fromarray(img.numpy())
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def plot_loss_curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training and validation reconstruction loss per epoch."""
    from ..plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss", "train"), ("val_loss", "val (fixed masks)")):
        pts = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss (hidden patches)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_loss_curves", "save_reconstruction_grid"]
