"""MAE figures: reconstruction grids and loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor


#: The rows of a reconstruction grid, top to bottom.
GRID_ROWS: tuple[str, ...] = ("original", "masked", "reconstruction")


def save_reconstruction_grid(grid: Tensor, path: Path, scale: int = 4,
                             row_labels: Sequence[str] = GRID_ROWS) -> Path:
    """Write a (3, K, C, H, W) grid in [0, 1] as a PNG: rows original / masked / reconstruction.

    Each row is labelled on the left ("original", "masked", "reconstruction"; ``row_labels``
    for other rows), in black on the grid's white background.
    """
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ImportError("reconstruction grids need Pillow: pip install pillow") from None
    rows, k, c, h, w = grid.shape
    if len(row_labels) != rows:
        raise ValueError(f"{rows} grid rows but {len(row_labels)} row labels")
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
    # the labels go into a white margin left of the grid, each centred on its row
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(pil)
    boxes = [probe.textbbox((0, 0), str(t), font=font) for t in row_labels]
    margin = max(b[2] - b[0] for b in boxes) + 8
    white = 255 if pil.mode == "L" else (255,) * len(pil.getbands())
    out = Image.new(pil.mode, (pil.width + margin, pil.height), white)
    out.paste(pil, (margin, 0))
    draw = ImageDraw.Draw(out)
    black = 0 if out.mode == "L" else (0,) * len(out.getbands())
    for r, (text, box) in enumerate(zip(row_labels, boxes)):
        centre = (pad + r * (h + pad) + h / 2) * scale
        draw.text((4, centre - (box[3] + box[1]) / 2), str(text), fill=black, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
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


__all__ = ["GRID_ROWS", "plot_loss_curves", "save_reconstruction_grid"]
