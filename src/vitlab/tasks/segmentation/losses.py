"""Segmentation losses: cross-entropy with an ignore index, optional Dice, auxiliary heads."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, eps: float = 1.0) -> Tensor:
    """Soft Dice loss over classes, ignoring pixels labelled ``ignore_index``.

    For each class k: ``1 - (2 * sum(p_k * y_k) + eps) / (sum(p_k) + sum(y_k) + eps)`` over
    the valid pixels of the batch, with p the softmax probabilities and y the one-hot
    target; the loss is the mean over classes.

    Args:
        logits: (B, K, H, W).
        target: (B, H, W) class indices.
        ignore_index: Label of pixels that do not count.
        eps: Smoothing added to numerator and denominator.

    Returns:
        A scalar.
    """
    k = logits.shape[1]
    valid = target != ignore_index  # (B, H, W)
    probs = logits.softmax(dim=1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).to(probs.dtype)  # (B, H, W, K) -> (B, K, H, W)
    onehot = onehot * valid[:, None]
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


class SegmentationLoss(nn.Module):
    """Cross-entropy (ignoring ``ignore_index``) + ``dice_weight`` * Dice, on the main and auxiliary logits.

    Args:
        ignore_index: Label of pixels that do not count (VOC/ADE20K use 255).
        dice_weight: Weight of the Dice term (0: cross-entropy only).
        aux_weights: Weight of each auxiliary head's loss.
        label_smoothing: Cross-entropy label smoothing.
    """

    def __init__(self, ignore_index: int = 255, dice_weight: float = 0.0, aux_weights: Sequence[float] = (),
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.aux_weights = [float(w) for w in aux_weights]
        self.label_smoothing = label_smoothing

    def single(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of one (B, K, H, W) logits tensor against (B, H, W) labels."""
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"logits are {tuple(logits.shape[-2:])} but the masks are {tuple(target.shape[-2:])}; "
                "upsample the logits to the mask size first"
            )
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0  # no valid pixel: zero, keeping the graph
        loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, target, self.ignore_index)
        return loss

    def forward(self, logits: Tensor, target: Tensor, aux_logits: Sequence[Tensor] = ()) -> Tensor:
        """Main loss plus the weighted auxiliary losses.

        Args:
            logits: (B, K, H, W) main logits.
            target: (B, H, W) labels.
            aux_logits: One (B, K, H, W) tensor per auxiliary head (none in eval mode).

        Returns:
            A scalar.
        """
        loss = self.single(logits, target)
        if aux_logits:
            if len(aux_logits) != len(self.aux_weights):
                raise ValueError(f"got {len(aux_logits)} auxiliary outputs but {len(self.aux_weights)} aux_weights")
            for w, a in zip(self.aux_weights, aux_logits):
                loss = loss + w * self.single(a, target)
        return loss
