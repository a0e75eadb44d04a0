"""Anchors, box coding, IoU matching and balanced sampling of the two R-CNN stages.

Conventions as torchvision's / Detectron's Mask R-CNN: boxes are ``(x0, y0, x1, y1)`` in input
pixels; regression targets are ``(dx, dy, dw, dh)`` relative to the reference box, scaled by
``weights`` (RPN ``(1, 1, 1, 1)``, box head ``(10, 10, 5, 5)``); a match is an index into the
ground truth, :data:`BELOW` under the low threshold (background) or :data:`BETWEEN` in between
(ignored).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..detection.box_ops import box_iou

BELOW = -1
BETWEEN = -2
#: Largest log-scale change a decoded box may get (torchvision: log(1000 / 16)).
SCALE_CLAMP = math.log(1000.0 / 16)


class AnchorGenerator(nn.Module):
    """Anchors of every pyramid level: ``sizes[l] x aspect_ratios`` centred on each cell's corner.

    Anchor ``a`` of cell ``(y, x)`` of level ``l`` is the base box ``a`` (area ``size^2``,
    height / width = ratio) shifted by ``(x, y) * stride``; they are ordered (y, x, a) like the
    RPN head's outputs.

    Args:
        sizes: Per level, the anchor sides in pixels.
        aspect_ratios: Height / width ratios, the same on every level.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> None:
        super().__init__()
        self.sizes = [tuple(float(s) for s in level) for level in sizes]
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.num_anchors = len(self.sizes[0]) * len(self.aspect_ratios)
        if any(len(level) != len(self.sizes[0]) for level in self.sizes):
            raise ValueError(f"every level needs the same number of anchor sizes, got {self.sizes}")

    def base_anchors(self, level: int) -> Tensor:
        """(A, 4) anchors of one level centred on (0, 0), rounded like torchvision's."""
        sizes = torch.tensor(self.sizes[level])
        ratios = torch.tensor(self.aspect_ratios)
        h_ratio = ratios.sqrt()
        w_ratio = 1 / h_ratio
        ws = (w_ratio[:, None] * sizes[None, :]).reshape(-1)  # (R, S) -> (R * S,)
        hs = (h_ratio[:, None] * sizes[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def forward(self, grids: Sequence[tuple[int, int]], strides: Sequence[float], device: torch.device) -> list[Tensor]:
        """Per level, the (h * w * A, 4) anchors of a (h, w) map of the given stride."""
        out = []
        for level, ((h, w), stride) in enumerate(zip(grids, strides)):
            ys = torch.arange(h, device=device, dtype=torch.float32) * stride
            xs = torch.arange(w, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # (h * w, 1, 4)
            out.append((shifts + self.base_anchors(level).to(device)[None]).reshape(-1, 4))  # (h * w * A, 4)
        return out


class BoxCoder:
    """Encodes boxes as deltas from reference boxes and decodes them back.

    Args:
        weights: ``(wx, wy, ww, wh)`` multiplying the deltas.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        self.weights = tuple(float(w) for w in weights)

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas (K, 4) that take ``reference`` (K, 4) to ``boxes`` (K, 4)."""
        wx, wy, ww, wh = self.weights
        rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
        return torch.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)],
                           dim=1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes (K, ..., 4) from deltas (K, ..., 4) (e.g. one per class) on ``reference`` (K, 4)."""
        wx, wy, ww, wh = self.weights
        rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
        shape = (-1,) + (1,) * (deltas.dim() - 2)
        rw, rh, rx, ry = (t.reshape(shape) for t in (rw, rh, rx, ry))
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=SCALE_CLAMP)
        dh = (deltas[..., 3] / wh).clamp(max=SCALE_CLAMP)
        cx, cy = dx * rw + rx, dy * rh + ry
        w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes (..., 4) clipped to an image of ``size`` = (H, W)."""
    h, w = size
    return torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
                        boxes[..., 3].clamp(0, h)], dim=-1)


def match_boxes(gt: Tensor, candidates: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """For each candidate (K, 4), the index of its best-overlapping ground-truth box (G, 4).

    IoU >= ``high``: that index; < ``low``: :data:`BELOW`; in between: :data:`BETWEEN`. With
    ``allow_low_quality`` every ground-truth box also keeps the candidates it overlaps most
    (ties included), however low that overlap (the RPN's rule).
    """
    if gt.numel() == 0:
        return torch.full((candidates.shape[0],), BELOW, dtype=torch.int64, device=candidates.device)
    iou = box_iou(gt, candidates)[0]  # (G, K)
    best, idx = iou.max(dim=0)
    matches = idx.clone()
    matches[best < low] = BELOW
    matches[(best >= low) & (best < high)] = BETWEEN
    if allow_low_quality:
        top = iou.max(dim=1, keepdim=True).values  # (G, 1)
        _, keep = torch.nonzero(iou == top, as_tuple=True)
        matches[keep] = idx[keep]
    return matches


def sample_balanced(labels: Tensor, num: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random positive (label >= 1) and negative (label 0) indices, ``num`` in all at most.

    At most ``num * positive_fraction`` positives; negatives fill the rest. Labels < 0 are
    ignored. Returns (positive indices, negative indices).
    """
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(pos.numel(), int(num * positive_fraction))
    n_neg = min(neg.numel(), num - n_pos)
    dev = labels.device
    pos = pos[torch.randperm(pos.numel(), generator=generator, device=generator.device if generator else dev)[:n_pos]
              .to(dev)]
    neg = neg[torch.randperm(neg.numel(), generator=generator, device=generator.device if generator else dev)[:n_neg]
              .to(dev)]
    return pos, neg


__all__ = ["AnchorGenerator", "BETWEEN", "BELOW", "BoxCoder", "clip_boxes", "match_boxes", "sample_balanced"]
