"""Classification metrics."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    if target.ndim == 2:  # soft targets (mixup): compare with their argmax
        target = target.argmax(dim=1)
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hits = top.eq(target.unsqueeze(1))  # (B, maxk)
    return {k: int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks}


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    idx = target.long() * num_classes + pred.long()
    # (K*K,) -> (K, K)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)
