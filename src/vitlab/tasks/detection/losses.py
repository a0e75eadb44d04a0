"""DETR's set-prediction loss: Hungarian matching, then class and box losses, on every decoder layer."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher


def _num_boxes(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> float:
    """Targets per process (averaged over the processes of a distributed run), at least 1."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return max(float(n.item()), 1.0)


class DETRLoss(nn.Module):
    """The DETR loss (Carion et al. 2020) on the outputs of one or more decoder layers.

    For each layer, the queries are matched to the targets with :class:`HungarianMatcher`
    (each layer gets its own matching), then:

    - ``loss_ce``: cross-entropy over ``num_classes + 1`` classes for every query, the
      unmatched ones having the no-object target (the last class), whose weight is
      ``eos_coef``; the mean is weighted (divided by the summed weights of the targets);
    - ``loss_bbox``: L1 between matched boxes (normalised cxcywh), summed and divided by
      the number of target boxes in the batch;
    - ``loss_giou``: ``1 - GIoU`` of matched boxes, summed and divided the same way.

    The last layer's terms are returned under these names, the others with the layer's index
    appended (``loss_ce_0`` is the first decoder layer), and ``loss`` is the weighted sum of
    all of them (the auxiliary losses weighted like the final ones).

    Args:
        num_classes: Number of object classes, no-object excluded.
        matcher: The matcher; default ``HungarianMatcher(1, 5, 2)``.
        eos_coef: Relative weight of the no-object class in ``loss_ce``.
        weight_ce: Weight of ``loss_ce`` in ``loss``.
        weight_bbox: Weight of ``loss_bbox`` in ``loss``.
        weight_giou: Weight of ``loss_giou`` in ``loss``.
        aux_loss: Also supervise every layer but the last (else only the last counts).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= eos_coef:
            raise ValueError(f"eos_coef must be >= 0, got {eos_coef}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.eos_coef = eos_coef
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.aux_loss = aux_loss
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        indices: Sequence[tuple[Tensor, Tensor]],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """The three loss terms of one layer for a given matching.

        Args:
            logits: Class logits ``(B, Q, num_classes + 1)``.
            boxes: Predicted boxes ``(B, Q, 4)``, normalised cxcywh.
            targets: Per image ``labels`` ``(T_i,)`` and ``boxes`` ``(T_i, 4)``.
            indices: The matching, as returned by the matcher.
            num_boxes: Normaliser of the box losses.

        Returns:
            ``loss_ce``, ``loss_bbox`` and ``loss_giou`` (scalars).
        """
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"expected logits with {self.num_classes} classes + no-object = {self.num_classes + 1} "
                f"channels, got {logits.shape[-1]}"
            )
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        target_classes[batch_idx, query_idx] = torch.cat(
            [t["labels"][j] for t, (_, j) in zip(targets, indices)]
        ).to(device)
        # (B, Q, C+1) -> (B, C+1, Q): cross_entropy wants classes on dim 1
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.class_weight.to(device))

        src = boxes[batch_idx, query_idx].float()  # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float().to(device)  # (M, 4)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        if len(src):
            giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
            loss_giou = (1 - giou).sum() / num_boxes
        else:
            loss_giou = boxes.sum() * 0.0
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(
        self,
        outputs: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
        targets: Sequence[Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            outputs: One dict per decoder layer, first to last (or a single dict for the last
                layer only), each with ``logits`` ``(B, Q, num_classes + 1)`` and ``boxes``
                ``(B, Q, 4)`` in normalised cxcywh.
            targets: One dict per image with ``labels`` ``(T_i,)`` int64 in
                ``[0, num_classes)`` and ``boxes`` ``(T_i, 4)`` normalised cxcywh.

        Returns:
            The loss terms (see the class docstring) and ``loss``, their weighted total.
        """
        layers = [outputs] if isinstance(outputs, Mapping) else list(outputs)
        if not layers:
            raise ValueError("DETRLoss got no decoder outputs")
        for t in targets:
            labels = t["labels"]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"target labels must lie in [0, {self.num_classes}), got {labels.tolist()}"
                )
        num_boxes = _num_boxes(targets, layers[-1]["logits"].device)
        if not self.aux_loss:
            layers = layers[-1:]
        losses: dict[str, Tensor] = {}
        total = layers[-1]["logits"].new_zeros((), dtype=torch.float32)
        last = len(layers) - 1
        for k, out in enumerate(layers):
            indices = self.matcher(out["logits"], out["boxes"], targets)
            suffix = "" if k == last else f"_{k}"
            for name, value in self.layer_losses(out["logits"], out["boxes"], targets, indices, num_boxes).items():
                losses[name + suffix] = value
                total = total + self.weights[name] * value
        losses["loss"] = total
        return losses


__all__ = ["DETRLoss"]
