"""Training curves and confusion matrices as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'vitlab[viz]'") from None
    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy per epoch from ``metrics.jsonl`` records."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((ax1, "loss", (("train_loss", "train"), ("val_loss", "val"))),
              (ax2, "accuracy (%)", (("val_top1", "val top-1"), ("ema_val_top1", "EMA val top-1"),
                                     ("train_top1", "train top-1"))))
    for ax, ylabel, series in panels:
        for key, label in series:
            vals = [h.get(key) for h in history]
            if any(v is not None for v in vals):
                ax.plot(epochs, vals, marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix: torch.Tensor, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    plt = _pyplot()
    n = matrix.shape[0]
    size = max(4.0, min(16.0, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    m = matrix.cpu().numpy()
    ax.imshow(m, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), labels=list(labels), rotation=90)
        ax.set_yticks(range(n), labels=list(labels))
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
