"""DN-DETR's denoising queries (Li et al., 2022): noised ground truth the decoder must reconstruct.

In training, every image's ground-truth objects are copied into ``groups`` groups; in each
copy a label is replaced by a random class with probability ``label_noise`` and a box
``(cx, cy, w, h)`` is shifted by up to ``box_noise * (w, h) / 2`` and rescaled by a factor
in ``[1 - box_noise, 1 + box_noise]``. The copies are extra decoder queries (placed before
the matching queries) whose target is known, so their loss needs no matching: this gives
the decoder a stable learning signal from the first step, the reason DN-DETR converges in
far fewer epochs. The self-attention mask keeps the matching queries from seeing any
denoising query (they would see the answer) and each group from seeing the other groups.

Images hold different numbers of objects: each group has ``T = max_i T_i`` slots and the
slots beyond an image's objects are padding (``valid`` False; no loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


@dataclass
class DenoisingQueries:
    """The denoising part of a decoder's queries.

    Attributes:
        labels: (B, D) noised labels (padding slots: ``num_classes``).
        boxes: (B, D) x 4 noised boxes, normalised cxcywh.
        valid: (B, D) bool, False on padding slots.
        target_labels: (B, D) the original labels.
        target_boxes: (B, D, 4) the original boxes.
        attn_bias: (D + Q, D + Q) additive self-attention bias (``-inf`` blocks).
        groups: Number of groups.
        num_queries: ``D``, the denoising queries per image.
    """

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    target_labels: Tensor
    target_boxes: Tensor
    attn_bias: Tensor
    groups: int
    num_queries: int


def denoising_attention_mask(groups: int, per_group: int, num_matching: int, device: torch.device | None = None) -> Tensor:
    """Which query may attend to which: (D + Q, D + Q) bool, True = blocked.

    Query order: ``groups`` blocks of ``per_group`` denoising queries, then ``num_matching``
    matching queries. A matching query sees only the matching queries; a denoising query
    sees its own group and the matching queries.
    """
    d = groups * per_group
    n = d + num_matching
    blocked = torch.zeros(n, n, dtype=torch.bool, device=device)
    blocked[d:, :d] = True  # matching queries never see the ground truth in the denoising queries
    for g in range(groups):
        lo, hi = g * per_group, (g + 1) * per_group
        blocked[lo:hi, :lo] = True  # nor does a group see the others
        blocked[lo:hi, hi:d] = True
    return blocked


def build_denoising_queries(
    targets: Sequence[Mapping[str, Tensor]],
    num_classes: int,
    num_matching: int,
    groups: int,
    label_noise: float,
    box_noise: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """Noised copies of the ground truth and the self-attention bias (see the module docstring).

    Args:
        targets: Per image ``labels`` (T_i,) and ``boxes`` (T_i, 4) normalised cxcywh.
        num_classes: Object classes (the padding label is ``num_classes``).
        num_matching: Matching queries that follow the denoising ones.
        groups: Copies of the ground truth.
        label_noise: Probability of replacing a label by a uniformly drawn class.
        box_noise: DN-DETR's ``lambda``: shift up to ``lambda * size / 2``, scale by ``1 +- lambda``.
        device: Where to build the tensors.
        generator: Source of randomness (the global RNG when None).

    Returns:
        The queries, or None when no image has an object.
    """
    t_max = max((len(t["labels"]) for t in targets), default=0)
    if t_max == 0 or groups == 0:
        return None
    b = len(targets)
    device = device or targets[0]["boxes"].device
    labels = torch.full((b, t_max), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(b, t_max, 4, device=device)
    valid = torch.zeros(b, t_max, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        labels[i, :n] = t["labels"].to(device)
        boxes[i, :n] = t["boxes"].to(device).float()
        valid[i, :n] = True
    # (B, T) -> (B, G * T): group g holds slots g * T ... (g + 1) * T - 1
    tgt_labels = labels.repeat(1, groups)
    tgt_boxes = boxes.repeat(1, groups, 1)
    valid = valid.repeat(1, groups)
    shape = tgt_labels.shape

    def rand(*size: int) -> Tensor:
        return torch.rand(*size, device=device, generator=generator)

    flip = rand(*shape) < label_noise
    random_labels = (rand(*shape) * num_classes).long().clamp(max=num_classes - 1)
    noised_labels = torch.where(flip & valid, random_labels, tgt_labels)
    cxcy, wh = tgt_boxes[..., :2], tgt_boxes[..., 2:]
    shift = (rand(*shape, 2) * 2 - 1) * box_noise * wh / 2
    scale = 1 + (rand(*shape, 2) * 2 - 1) * box_noise
    noised_boxes = torch.cat([(cxcy + shift).clamp(0, 1), (wh * scale).clamp(1e-4, 1)], dim=-1)
    noised_boxes = torch.where(valid[..., None], noised_boxes, torch.full_like(noised_boxes, 0.5))
    blocked = denoising_attention_mask(groups, t_max, num_matching, device=device)
    bias = torch.zeros(blocked.shape, device=device).masked_fill(blocked, float("-inf"))
    return DenoisingQueries(noised_labels, noised_boxes, valid, tgt_labels, tgt_boxes, bias, groups, groups * t_max)


def denoising_losses(logits: Tensor, boxes: Tensor, queries: DenoisingQueries,
                     num_boxes: float) -> dict[str, Tensor]:
    """Reconstruction losses of one decoder layer's denoising outputs.

    Every valid denoising query is supervised by the object it was made from: cross-entropy
    of its logits with the original label (summed), L1 of its box and ``1 - GIoU`` (summed),
    each divided by ``num_boxes * groups`` (the ground-truth count times the copies).

    Args:
        logits: (B, D, num_classes + 1).
        boxes: (B, D, 4) normalised cxcywh.
        queries: The :class:`DenoisingQueries` the outputs belong to.
        num_boxes: Ground-truth objects in the batch (at least 1).

    Returns:
        ``loss_ce``, ``loss_bbox``, ``loss_giou`` (scalars).
    """
    v = queries.valid
    denom = max(float(num_boxes), 1.0) * queries.groups
    loss_ce = F.cross_entropy(logits[v].float(), queries.target_labels[v], reduction="sum") / denom
    src, tgt = boxes[v].float(), queries.target_boxes[v].float()
    loss_bbox = F.l1_loss(src, tgt, reduction="sum") / denom
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    loss_giou = (1 - giou).sum() / denom
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


__all__ = ["DenoisingQueries", "build_denoising_queries", "denoising_attention_mask", "denoising_losses"]
