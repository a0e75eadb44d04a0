"""Box format conversions, areas, IoU and generalized IoU.

Formats (the last dimension holds 4 numbers):

- ``xyxy``: corners ``(x0, y0, x1, y1)``, with ``x1 >= x0`` and ``y1 >= y0``;
- ``cxcywh``: centre and size ``(cx, cy, w, h)``; DETR predicts it normalised to ``[0, 1]``;
- ``xywh``: COCO's top-left corner and size ``(x, y, w, h)`` in pixels.

Degenerate boxes (zero width or height) are allowed: they have no area, so their IoU with
anything is 0 (never NaN, also where the union has no area), and generalized IoU drops its
penalty term where the enclosing box has no area. Inverted boxes (``x1 < x0``) are an error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)``.

    Args:
        boxes: Boxes ``(..., 4)`` in cxcywh.

    Returns:
        The same boxes ``(..., 4)`` in xyxy.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x0, y0, x1, y1)`` -> ``(cx, cy, w, h)``.

    Args:
        boxes: Boxes ``(..., 4)`` in xyxy.

    Returns:
        The same boxes ``(..., 4)`` in cxcywh.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``(x, y, w, h)`` -> ``(x0, y0, x1, y1)``.

    Args:
        boxes: Boxes ``(..., 4)`` in xywh.

    Returns:
        The same boxes ``(..., 4)`` in xyxy.
    """
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``(x0, y0, x1, y1)`` -> COCO ``(x, y, w, h)``.

    Args:
        boxes: Boxes ``(..., 4)`` in xyxy.

    Returns:
        The same boxes ``(..., 4)`` in xywh.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def normalize_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """xyxy pixel boxes -> cxcywh normalised by the image size (DETR's targets).

    Args:
        boxes: Boxes ``(N, 4)`` in xyxy pixels.
        image_size: ``(height, width)`` of the image.

    Returns:
        Boxes ``(N, 4)`` in cxcywh, in ``[0, 1]`` for boxes inside the image.
    """
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
    return box_xyxy_to_cxcywh(boxes.float() / scale)


def _check_xyxy(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    if boxes.numel() and bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
        raise ValueError(f"{name} holds inverted boxes (x1 < x0 or y1 < y0); expected (x0, y0, x1, y1) corners")


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes.

    Args:
        boxes: Boxes ``(N, 4)`` in xyxy.

    Returns:
        Areas ``(N,)``.
    """
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection over union of two sets of xyxy boxes.

    Args:
        boxes1: Boxes ``(N, 4)`` in xyxy.
        boxes2: Boxes ``(M, 4)`` in xyxy.

    Returns:
        ``(iou, union)``, both ``(N, M)``; IoU is 0 where the union has no area.

    Raises:
        ValueError: A set is not ``(K, 4)`` or holds inverted boxes.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))
    return iou, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of two sets of xyxy boxes.

    ``GIoU = IoU - (C - U) / C`` with ``C`` the area of the smallest box enclosing both and
    ``U`` their union; it lies in ``[-1, 1]``. Where ``C`` is 0 (two identical degenerate
    boxes), the penalty term is 0 and GIoU equals IoU (0).

    Args:
        boxes1: Boxes ``(N, 4)`` in xyxy.
        boxes2: Boxes ``(M, 4)`` in xyxy.

    Returns:
        GIoU ``(N, M)``.

    Raises:
        ValueError: A set is not ``(K, 4)`` or holds inverted boxes.
    """
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    penalty = torch.where(
        enclosing > 0,
        (enclosing - union) / enclosing.clamp(min=torch.finfo(enclosing.dtype).tiny),
        torch.zeros_like(enclosing),
    )
    return iou - penalty


__all__ = [
    "box_area", "box_cxcywh_to_xyxy", "box_iou", "box_xywh_to_xyxy", "box_xyxy_to_cxcywh", "box_xyxy_to_xywh",
    "generalized_box_iou", "normalize_boxes",
]
