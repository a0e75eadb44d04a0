"""Colour masks and overlays: the PASCAL VOC palette, mask PNGs and image/mask overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, class 0 black, 255 (VOC's border) light grey.

    Class ``c``'s colour spreads the bits of ``c`` over the high bits of R, G and B (bit 0
    -> R, bit 1 -> G, bit 2 -> B, then the next lower bit of each channel).
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for j in range(8):
            r |= ((v >> 0) & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        pal[c] = (r, g, b)
    return pal


def colorize(mask: Tensor | np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3) uint8 in the VOC palette (ids above 255 wrap)."""
    ids = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).astype(np.int64) % 256
    return voc_palette()[ids]


def to_rgb(image: Tensor) -> np.ndarray:
    """A [0, 1] image (C, H, W) with 1 or 3 channels -> (H, W, 3) uint8."""
    x = image.detach().float().cpu().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # (C, H, W) -> (H, W, C)


def overlay(image: Tensor, mask: Tensor | np.ndarray, alpha: float = 0.5, background: int | None = 0) -> np.ndarray:
    """The image with the mask's colours blended in: (H, W, 3) uint8.

    Args:
        image: [0, 1] image (C, H, W).
        mask: Class ids (H, W) of the same size.
        alpha: Weight of the mask colour.
        background: Class left uncoloured (None: colour every class).
    """
    rgb = to_rgb(image).astype(np.float32)
    ids = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask)
    if ids.shape != rgb.shape[:2]:
        raise ValueError(f"mask {ids.shape} and image {rgb.shape[:2]} differ in size")
    colour = colorize(ids).astype(np.float32)
    a = np.full(ids.shape, alpha, dtype=np.float32)
    if background is not None:
        a[ids == background] = 0.0
    out = rgb * (1 - a[..., None]) + colour * a[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_mask_png(mask: Tensor | np.ndarray, path: str | Path) -> Path:
    """Write class ids (H, W) as a palette PNG (mode P, VOC colours; pixel values are the ids).

    The file reads back with :class:`~vitlab.datasets.seg_folder.SegmentationFolder`.

    Raises:
        ValueError: A class id outside 0..255.
    """
    from PIL import Image

    ids = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"a palette PNG holds class ids 0..255, got {int(ids.min())}..{int(ids.max())}")
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def overlay_grid_figure(images: Sequence[Tensor], targets: Sequence[Tensor], preds: Sequence[Tensor],
                        labels: Sequence[str] | None = None, ignore_index: int = 255) -> Any:
    """The matplotlib figure of :func:`save_overlay_grid` (not saved, not closed).

    With ``labels``, each row's prediction panel gets a legend: one colour patch per class in
    the row's ground truth or prediction (background excluded), in that class's overlay colour.
    """
    from ..plots import _pyplot

    plt = _pyplot()
    from matplotlib.patches import Patch

    pal = voc_palette()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i, (x, t, p) in enumerate(zip(images, targets, preds)):
        t = torch.where(t == ignore_index, torch.zeros_like(t), t)
        for ax, img, title in ((axes[i, 0], to_rgb(x), "image"), (axes[i, 1], overlay(x, t), "ground truth"),
                               (axes[i, 2], overlay(x, p), "prediction")):
            ax.imshow(img, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title)
        if labels is not None:
            present = sorted(set(t.unique().tolist()) | set(p.unique().tolist()))
            handles = [Patch(facecolor=pal[c % 256] / 255.0, edgecolor="black", linewidth=0.5, label=labels[c])
                       for c in present if 0 < c < len(labels)]
            if handles:
                axes[i, 2].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7,
                                  frameon=False, handlelength=1.2, borderaxespad=0.0)
    fig.tight_layout()
    return fig


def save_overlay_grid(images: Sequence[Tensor], targets: Sequence[Tensor], preds: Sequence[Tensor],
                      path: str | Path, labels: Sequence[str] | None = None, ignore_index: int = 255) -> Path:
    """A figure with one row per image: the image, ground truth overlay, prediction overlay.

    With ``labels``, a legend of colour patches (one per class present, in its overlay colour)
    sits right of each prediction. Needs matplotlib (the ``viz`` extra).
    """
    from ..plots import _pyplot

    fig = overlay_grid_figure(images, targets, preds, labels, ignore_index)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": the legends right of the last column fit
    _pyplot().close(fig)
    return path


def plot_segmentation_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Loss (train, val) and mIoU / pixel accuracy (val, EMA val) per epoch from ``metrics.jsonl`` records."""
    from ..plots import _pyplot

    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in ((ax1, ("train_loss", "val_loss")),
                     (ax2, ("val_mIoU", "ema_val_mIoU", "val_pixel_accuracy", "train_pixel_accuracy"))):
        for key in keys:
            vals = [h.get(key) for h in history]
            if any(v is not None for v in vals):
                ax.plot(epochs, vals, marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.legend()
    ax1.set_ylabel("loss")
    ax2.set_ylabel("mIoU / accuracy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["colorize", "overlay", "overlay_grid_figure", "plot_segmentation_curves", "save_mask_png",
           "save_overlay_grid", "to_rgb", "voc_palette"]
