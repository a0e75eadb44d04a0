"""Instance segmentation figures: loss / AP curves, and masks + boxes against the ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def plot_instance_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss and validation box / mask AP50 and AP per epoch."""
    from ..detection.plots import plot_detection_curves

    return plot_detection_curves(history, path, (("val_AP50", "box AP@.5"), ("val_AP", "box AP"),
                                                 ("val_mask_AP50", "mask AP@.5"), ("val_mask_AP", "mask AP")))


def plot_instances(samples: Sequence[Mapping[str, Any]], labels: Sequence[str], path: str | Path,
                   score_threshold: float = 0.5) -> Path:
    """Per image: the ground-truth boxes (green, dashed) and the predictions scoring >= ``score_threshold``
    (red boxes, their masks as coloured overlays); a panel with none says so."""
    from ..plots import _pyplot

    plt = _pyplot()
    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, s in zip(axes[0], samples):
        img = s["image"].float()
        grey = (img[0] if img.shape[0] == 1 else img.mean(0)).numpy()
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        shown = 0
        for k, ((x0, y0, x1, y1), lab, sc) in enumerate(zip(s["boxes"].tolist(), s["labels"].tolist(),
                                                          s["scores"].tolist())):
            if sc < score_threshold:
                continue
            colour = np.array(colours(shown % 10)[:3])
            m = s["masks"][k].numpy() >= 0.5
            rgb[m] = 0.5 * rgb[m] + 0.5 * colour
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))
            ax.text(x0, y0, f"{labels[lab]} {sc:.2f}", color="red", fontsize=7, va="bottom")
            shown += 1
        ax.imshow(rgb, vmin=0, vmax=1)
        for (x0, y0, x1, y1) in s["gt_boxes"].tolist():
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", ls="--", lw=1))
        if not shown:
            ax.text(0.5, 0.03, f"no detection >= {score_threshold:.2f}", transform=ax.transAxes, ha="center",
                    va="bottom", color="red", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.axis("off")
    fig.suptitle("ground truth (green, dashed) vs predictions (red boxes, coloured masks)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


__all__ = ["plot_instance_curves", "plot_instances"]
