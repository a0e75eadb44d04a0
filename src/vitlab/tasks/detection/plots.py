"""Detection figures: loss / AP curves and predictions against the ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def plot_detection_curves(history: Sequence[dict[str, Any]], path: str | Path,
                          curves: Sequence[tuple[str, str]] = (("val_AP50", "AP50"), ("val_AP", "AP"))) -> Path:
    """Training loss and the validation metrics ``curves`` ((history key, legend label) pairs) per epoch."""
    from ..plots import _pyplot

    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h.get("train_loss") for h in history], marker=".", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key, label in curves:
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):  # None (nothing to measure, or not evaluated): a gap
            ax2.plot(epochs, [float("nan") if v is None else v for v in vals], marker=".", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation AP")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def predictions_figure(samples: Sequence[Mapping[str, Any]], labels: Sequence[str],
                       score_threshold: float = 0.5) -> Any:
    """The matplotlib figure of :func:`plot_predictions` (not saved, not closed).

    A panel where no prediction scores ``>= score_threshold`` says so
    (``"no detection >= 0.50"``) instead of showing only the ground truth.
    """
    from ..plots import _pyplot

    plt = _pyplot()
    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3), squeeze=False)
    for ax, s in zip(axes[0], samples):
        img = s["image"].float()
        ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(), cmap="gray", vmin=0, vmax=1)
        for (x0, y0, x1, y1), lab in zip(s["gt_boxes"].tolist(), s["gt_labels"].tolist()):
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", ls="--", lw=1))
        shown = 0
        for (x0, y0, x1, y1), lab, sc in zip(s["boxes"].tolist(), s["labels"].tolist(), s["scores"].tolist()):
            if sc < score_threshold:
                continue
            shown += 1
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))
            ax.text(x0, y0, f"{labels[lab]} {sc:.2f}", color="red", fontsize=7, va="bottom")
        if not shown:
            ax.text(0.5, 0.03, f"no detection >= {score_threshold:.2f}", transform=ax.transAxes, ha="center",
                    va="bottom", color="red", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.axis("off")
    fig.suptitle("ground truth (green, dashed) vs predictions (red)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_predictions(samples: Sequence[Mapping[str, Any]], labels: Sequence[str], path: str | Path,
                     score_threshold: float = 0.5) -> Path:
    """Images with ground truth (green, dashed) and predictions scoring >= ``score_threshold`` (red).

    A panel with no prediction at or above the threshold reads ``no detection >= 0.50``.
    """
    from ..plots import _pyplot

    fig = predictions_figure(samples, labels, score_threshold)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return Path(path)


__all__ = ["plot_detection_curves", "plot_predictions", "predictions_figure"]
