"""Turn DETR outputs into detections: scores, labels and boxes in input-image pixels."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy


def postprocess_detections(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: Sequence[tuple[int, int]] | Tensor,
    score_threshold: float = 0.0,
    top_k: int | None = None,
) -> list[dict[str, Tensor]]:
    """Detections per image from DETR's class logits and normalised boxes.

    A query's score is its highest softmax probability among the object classes (the
    no-object class, last, is never a label); queries scoring below ``score_threshold`` are
    dropped, then the ``top_k`` best are kept, highest score first. Boxes go from normalised
    cxcywh to xyxy pixels of the image the model saw (``x * width``, ``y * height``), clipped
    to the image.

    Args:
        logits: Class logits ``(B, Q, num_classes + 1)``, no-object last.
        boxes: Boxes ``(B, Q, 4)``, normalised cxcywh.
        image_sizes: ``(height, width)`` per image, ``B`` of them.
        score_threshold: Minimum score kept.
        top_k: At most this many detections per image (all when ``None``).

    Returns:
        Per image a dict with ``scores`` ``(K,)`` descending, ``labels`` ``(K,)`` int64 and
        ``boxes`` ``(K, 4)`` xyxy pixels; ``K`` may be 0.
    """
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(
            f"expected logits (B, Q, C+1) and boxes (B, Q, 4), got {tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=boxes.device).reshape(-1, 2)  # (B, 2) = (h, w)
    if len(sizes) != len(logits):
        raise ValueError(f"got {len(sizes)} image sizes for a batch of {len(logits)} images")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)  # (B, Q), (B, Q)
    h, w = sizes.unbind(-1)
    scale = torch.stack((w, h, w, h), dim=-1)[:, None, :]  # (B, 1, 4)
    xyxy = box_cxcywh_to_xyxy(boxes.float()) * scale
    xyxy = torch.minimum(xyxy.clamp(min=0), scale)
    results: list[dict[str, Tensor]] = []
    for s, lab, b in zip(scores, labels, xyxy):
        keep = torch.nonzero(s >= score_threshold).flatten()
        order = keep[s[keep].argsort(descending=True, stable=True)]
        if top_k is not None:
            order = order[:top_k]
        results.append({"scores": s[order], "labels": lab[order], "boxes": b[order]})
    return results


__all__ = ["postprocess_detections"]
