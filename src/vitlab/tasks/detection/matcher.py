"""Hungarian matching of DETR's predictions to the ground-truth objects of each image."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError(
            "Hungarian matching needs scipy: pip install 'vitlab[detection]' (scipy)"
        ) from None
    return linear_sum_assignment


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions (queries) to targets, per image.

    The cost of matching query ``q`` to target ``t`` is
    ``cost_class * (-p_q[class_t]) + cost_bbox * L1(box_q, box_t) + cost_giou * (-GIoU(box_q, box_t))``
    with ``p_q`` the softmax over the classes plus no-object, boxes in normalised cxcywh and
    GIoU on their xyxy corners. Each image's cost block ``(Q, T_i)`` is built and solved on its
    own with ``scipy.optimize.linear_sum_assignment`` (never one ``(B*Q, sum T)`` matrix, which
    is quadratic in the batch and DETR's CPU bottleneck). Non-finite costs are replaced by the
    largest float, so a diverged prediction is only matched when nothing else is left.

    Args:
        cost_class: Weight of the class cost.
        cost_bbox: Weight of the L1 box cost.
        cost_giou: Weight of the GIoU cost.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(
                f"matcher costs must be >= 0 and not all 0, got class={cost_class}, bbox={cost_bbox}, giou={cost_giou}"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """The matching cost of one image.

        Args:
            logits: Class logits ``(Q, num_classes + 1)``, no-object last.
            boxes: Predicted boxes ``(Q, 4)``, normalised cxcywh.
            labels: Target classes ``(T,)`` in ``[0, num_classes)``.
            target_boxes: Target boxes ``(T, 4)``, normalised cxcywh.

        Returns:
            Costs ``(Q, T)``, finite.
        """
        prob = logits.float().softmax(-1)
        boxes = boxes.float()
        target_boxes = target_boxes.float().to(boxes.device)
        c_class = -prob[:, labels.to(prob.device)]
        c_bbox = torch.cdist(boxes, target_boxes, p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou
        big = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image's queries to its targets.

        Args:
            logits: Class logits ``(B, Q, num_classes + 1)``, no-object last.
            boxes: Predicted boxes ``(B, Q, 4)``, normalised cxcywh.
            targets: One dict per image with ``labels`` ``(T_i,)`` int64 and ``boxes``
                ``(T_i, 4)`` normalised cxcywh.

        Returns:
            Per image, ``(query_idx, target_idx)``: two int64 tensors of length
            ``min(Q, T_i)``, ``query_idx`` ascending; ``query_idx[k]`` is matched to
            ``target_idx[k]``. Images without targets get two empty tensors.
        """
        if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
            raise ValueError(
                f"expected logits (B, Q, C+1) and boxes (B, Q, 4), got {tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} images")
        solve = _linear_sum_assignment()
        out: list[tuple[Tensor, Tensor]] = []
        for i, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[i], boxes[i], t["labels"], t["boxes"])
            rows, cols = solve(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out


__all__ = ["HungarianMatcher"]
