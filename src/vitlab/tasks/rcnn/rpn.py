"""The region proposal network: objectness and box deltas per anchor, proposals after NMS, its loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import BETWEEN, AnchorGenerator, BoxCoder, clip_boxes, match_boxes, sample_balanced
from .ops import batched_nms


class RPNHead(nn.Module):
    """``depth`` 3x3 conv + ReLU layers shared by every level, then 1x1 convs for objectness and deltas.

    Args:
        channels: Channels of the pyramid levels.
        num_anchors: Anchors per cell.
        depth: Shared 3x3 convolutions (ViTDet: 2).
    """

    def __init__(self, channels: int, num_anchors: int, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, maps: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness (B, h * w * A) and deltas (B, h * w * A, 4), ordered (y, x, a)."""
        scores, deltas = [], []
        for x in maps:
            t = self.conv(x)
            s, d = self.flatten(self.cls_logits(t), self.bbox_pred(t))
            scores.append(s)
            deltas.append(d)
        return scores, deltas

    @staticmethod
    def flatten(scores: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
        """Conv outputs (B, A, h, w) and (B, A * 4, h, w) -> (B, h * w * A) and (B, h * w * A, 4)."""
        b, a, h, w = scores.shape
        flat = scores.permute(0, 2, 3, 1).reshape(b, -1)  # (B, A, h, w) -> (B, h, w, A) -> (B, h * w * A)
        # (B, A * 4, h, w) -> (B, A, 4, h, w) -> (B, h, w, A, 4) -> (B, h * w * A, 4)
        return flat, deltas.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)


class RegionProposalNetwork(nn.Module):
    """Anchors + :class:`RPNHead` + proposal selection + the RPN loss (Faster R-CNN).

    Args:
        channels: Channels of the pyramid levels.
        anchor_sizes: Per level, anchor sides in pixels.
        aspect_ratios: Anchor height / width ratios.
        head_depth: 3x3 convolutions of the head.
        pre_nms_top_n: Per level and image, the best-scoring anchors kept before NMS (train, test).
        post_nms_top_n: Proposals kept per image after NMS (train, test).
        nms_threshold: IoU of the NMS between proposals of one level.
        fg_iou: Anchors with at least this IoU with an object are positives.
        bg_iou: Anchors under this IoU with every object are negatives.
        batch_size_per_image: Anchors sampled per image for the loss.
        positive_fraction: Most positives among them.
    """

    def __init__(self, channels: int, anchor_sizes: Sequence[Sequence[float]],
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), head_depth: int = 2,
                 pre_nms_top_n: tuple[int, int] = (2000, 1000), post_nms_top_n: tuple[int, int] = (2000, 1000),
                 nms_threshold: float = 0.7, fg_iou: float = 0.7, bg_iou: float = 0.3, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, min_size: float = 1e-3) -> None:
        super().__init__()
        self.anchors = AnchorGenerator(anchor_sizes, aspect_ratios)
        self.head = RPNHead(channels, self.anchors.num_anchors, head_depth)
        self.coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.pre_nms_top_n, self.post_nms_top_n = tuple(pre_nms_top_n), tuple(post_nms_top_n)
        self.nms_threshold, self.fg_iou, self.bg_iou = nms_threshold, fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction, self.min_size = batch_size_per_image, positive_fraction, min_size

    def forward(self, maps: Sequence[Tensor], strides: Sequence[float], image_size: tuple[int, int],
                targets: Sequence[dict[str, Tensor]] | None = None,
                generator: torch.Generator | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (P_i, 4) (detached) and, with ``targets``, the losses
        ``loss_objectness`` and ``loss_rpn_box``."""
        scores, deltas = self.head(maps)
        anchors = self.anchors([m.shape[-2:] for m in maps], strides, maps[0].device)
        proposals = self.select(scores, deltas, anchors, image_size)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self.loss(torch.cat(scores, 1), torch.cat(deltas, 1), torch.cat(anchors), targets, generator)
        return proposals, losses

    @torch.no_grad()
    def select(self, scores: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
               image_size: tuple[int, int]) -> list[Tensor]:
        """Top anchors per level, decoded, clipped, small ones dropped, NMS per level, top post-NMS."""
        pre = self.pre_nms_top_n[0 if self.training else 1]
        post = self.post_nms_top_n[0 if self.training else 1]
        batch = scores[0].shape[0]
        out = []
        for i in range(batch):
            boxes, objectness, levels = [], [], []
            for lvl, (s, d, a) in enumerate(zip(scores, deltas, anchors)):
                k = min(pre, s.shape[1])
                top, idx = s[i].topk(k)
                boxes.append(clip_boxes(self.coder.decode(d[i, idx].float(), a[idx]), image_size))
                objectness.append(top.float())
                levels.append(torch.full((k,), lvl, dtype=torch.int64, device=s.device))
            b, o, lv = torch.cat(boxes), torch.cat(objectness), torch.cat(levels)
            wh = b[:, 2:] - b[:, :2]
            keep = (wh >= self.min_size).all(dim=1)
            b, o, lv = b[keep], o[keep], lv[keep]
            keep = batched_nms(b, o, lv, self.nms_threshold)[:post]
            out.append(b[keep])
        return out

    def loss(self, scores: Tensor, deltas: Tensor, anchors: Tensor, targets: Sequence[dict[str, Tensor]],
             generator: torch.Generator | None) -> dict[str, Tensor]:
        """Binary cross-entropy on sampled anchors, smooth L1 (beta 1/9) on the positives' deltas."""
        sampled_pos, sampled_neg, box_targets = [], [], []
        for i, t in enumerate(targets):
            m = match_boxes(t["boxes"], anchors, self.fg_iou, self.bg_iou, allow_low_quality=True)
            labels = (m >= 0).to(torch.int64)
            labels[m == BETWEEN] = -1
            pos, neg = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction, generator)
            sampled_pos.append(pos + i * anchors.shape[0])
            sampled_neg.append(neg + i * anchors.shape[0])
            box_targets.append(self.coder.encode(t["boxes"][m[pos]], anchors[pos]) if pos.numel()
                               else anchors.new_zeros(0, 4))
        pos, neg = torch.cat(sampled_pos), torch.cat(sampled_neg)
        flat_scores, flat_deltas = scores.reshape(-1), deltas.reshape(-1, 4)
        idx = torch.cat([pos, neg])
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(flat_scores.dtype)
        n = max(idx.numel(), 1)
        objectness = F.binary_cross_entropy_with_logits(flat_scores[idx], labels, reduction="sum") / n
        box = F.smooth_l1_loss(flat_deltas[pos].float(), torch.cat(box_targets), beta=1 / 9, reduction="sum") / n
        return {"loss_objectness": objectness, "loss_rpn_box": box}


__all__ = ["RPNHead", "RegionProposalNetwork"]
