"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The matrix is the one torchmetrics' ``MulticlassJaccardIndex`` accumulates (rows: target,
columns: prediction, pixels labelled ``ignore_index`` dropped); a test checks the two agree.
Classes absent from both target and prediction have IoU NaN and are left out of the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SegmentationMetrics:
    """Accumulates a (K, K) confusion matrix over batches.

    Args:
        num_classes: K.
        ignore_index: Target label of pixels that do not count.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            pred: (B, H, W) class indices or (B, K, H, W) logits.
            target: (B, H, W) labels in [0, K) or ``ignore_index``.
        """
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
        k = self.num_classes
        valid = target != self.ignore_index
        t, p = target[valid].long().cpu(), pred[valid].long().cpu()
        bad = (t < 0) | (t >= k)
        if bad.any():
            raise ValueError(
                f"target label {int(t[bad][0])} is outside 0..{k - 1} and is not the ignore index {self.ignore_index}"
            )
        self.confusion += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)  # (K*K,) -> (K, K)

    def iou(self) -> Tensor:
        """Per-class IoU (K,) as float64: TP / (TP + FP + FN); NaN for a class seen nowhere."""
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def compute(self) -> dict[str, float | list[float]]:
        """``mIoU`` (mean over classes present), ``per_class_iou``, ``pixel_accuracy``."""
        iou = self.iou()
        cm = self.confusion.double()
        total = cm.sum()
        return {
            "mIoU": float(iou.nanmean()) if (~iou.isnan()).any() else float("nan"),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": float(cm.diag().sum() / total) if total > 0 else float("nan"),
        }
