"""The second R-CNN stage: multi-level RoIAlign, the box head (4conv1fc with LayerNorm), the
mask head (14x14 RoIs -> 28x28 masks), their losses and the detections of an image.

Labels inside this module are ``1..C`` with ``0`` for background; the model hands them in and
out as the datasets' ``0..C-1``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import BELOW, BoxCoder, clip_boxes, match_boxes, sample_balanced
from .neck import conv_norm
from .ops import batched_nms, map_levels, paste_masks_in_image, roi_align


def pool_rois(maps: Sequence[Tensor], strides: Sequence[float], boxes: Sequence[Tensor], output_size: int,
              canonical_scale: float = 224.0, canonical_level: int = 4) -> Tensor:
    """RoIAlign (aligned, adaptive sampling) of each image's boxes on its pyramid level.

    Args:
        maps: Pyramid levels (B, C, h_l, w_l), finest first (P6 excluded).
        strides: Their strides (powers of 2).
        boxes: Per image, (K_i, 4) boxes in input pixels.
        output_size: Side of the pooled features.

    Returns:
        (sum K_i, C, output_size, output_size), images in order.
    """
    rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1)
                      for i, b in enumerate(boxes)])  # (K, 5): image index, x0, y0, x1, y1
    k_min, k_max = int(round(math.log2(strides[0]))), int(round(math.log2(strides[-1])))
    levels = map_levels(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level)  # FPN's eq. 1
    pooled, order = [], []
    for lvl, (fmap, stride) in enumerate(zip(maps, strides)):
        idx = torch.nonzero(levels == lvl).flatten()
        if idx.numel():
            pooled.append(roi_align(fmap, rois[idx].to(fmap.dtype), output_size, spatial_scale=1.0 / stride,
                                    sampling_ratio=0, aligned=True))
            order.append(idx)
    if not pooled:
        return maps[0].new_zeros(0, maps[0].shape[1], output_size, output_size)
    # concatenated level by level; put back in the boxes' order
    return torch.cat(pooled)[torch.argsort(torch.cat(order))]


class BoxHead(nn.Module):
    """``num_convs`` LayerNorm'd 3x3 convolutions on the pooled RoIs, one fc layer, then class
    scores (C + 1) and class-specific box deltas (C x 4)."""

    def __init__(self, channels: int, pooled: int, num_classes: int, conv_dim: int = 256, num_convs: int = 4,
                 fc_dim: int = 1024, norm: bool = True) -> None:
        super().__init__()
        convs = [conv_norm(channels if i == 0 else conv_dim, conv_dim, 3, norm, act=True) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        width = (conv_dim if num_convs else channels) * pooled * pooled
        self.fc = nn.Sequential(nn.Flatten(1), nn.Linear(width, fc_dim), nn.ReLU(inplace=True))
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, num_classes * 4)
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(K, C, p, p) -> class logits (K, C + 1) and deltas (K, C, 4)."""
        h = self.fc(self.convs(x))
        return self.cls_score(h), self.bbox_pred(h).view(len(x), -1, 4)  # (K, C * 4) -> (K, C, 4)


class MaskHead(nn.Module):
    """``num_convs`` LayerNorm'd 3x3 convolutions, a 2x transposed convolution, per-class mask logits."""

    def __init__(self, channels: int, num_classes: int, conv_dim: int = 256, num_convs: int = 4,
                 norm: bool = True) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[conv_norm(channels if i == 0 else conv_dim, conv_dim, 3, norm, act=True)
                                     for i in range(num_convs)])
        width = conv_dim if num_convs else channels
        self.deconv = nn.ConvTranspose2d(width, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m is not self.predictor:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(K, C, m, m) -> mask logits (K, num_classes, 2m, 2m)."""
        return self.predictor(F.relu(self.deconv(self.convs(x))))


class RoIHeads(nn.Module):
    """Box and mask heads on the proposals: training losses, or the final detections.

    Args:
        channels: Channels of the pyramid levels.
        num_classes: Object classes (background excluded).
        box_pool: Side of the box head's pooled RoIs (7).
        mask_pool: Side of the mask head's pooled RoIs (14; masks come out twice as large).
        masks: Predict instance masks (Mask R-CNN) or boxes only (Faster R-CNN).
        conv_dim, box_convs, fc_dim, mask_convs, norm: Head widths, depths and the LayerNorm switch.
        batch_size_per_image: Proposals sampled per image for the loss (512).
        positive_fraction: Most positives among them (0.25).
        fg_iou: Proposals with at least this IoU with an object are positives (0.5).
        score_threshold, nms_threshold, detections_per_image: Inference filtering.
        canonical_scale, canonical_level: The level mapping (a box of ``canonical_scale``
            pixels is pooled on level ``canonical_level``).
    """

    def __init__(self, channels: int, num_classes: int, box_pool: int = 7, mask_pool: int = 14, masks: bool = True,
                 conv_dim: int = 256, box_convs: int = 4, fc_dim: int = 1024, mask_convs: int = 4, norm: bool = True,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, fg_iou: float = 0.5,
                 score_threshold: float = 0.05, nms_threshold: float = 0.5, detections_per_image: int = 100,
                 canonical_scale: float = 224.0, canonical_level: int = 4) -> None:
        super().__init__()
        self.num_classes, self.box_pool, self.mask_pool = num_classes, box_pool, mask_pool
        self.box_head = BoxHead(channels, box_pool, num_classes, conv_dim, box_convs, fc_dim, norm)
        self.mask_head = MaskHead(channels, num_classes, conv_dim, mask_convs, norm) if masks else None
        self.coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.batch_size_per_image, self.positive_fraction, self.fg_iou = batch_size_per_image, positive_fraction, fg_iou
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.detections_per_image = detections_per_image
        self.canonical = (canonical_scale, canonical_level)

    def pool(self, maps: Sequence[Tensor], strides: Sequence[float], boxes: Sequence[Tensor], size: int) -> Tensor:
        return pool_rois(maps, strides, boxes, size, *self.canonical)

    # ----------------------------------------------------------------- training
    def loss(self, maps: Sequence[Tensor], strides: Sequence[float], proposals: Sequence[Tensor],
             targets: Sequence[dict[str, Tensor]], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``loss_cls`` (cross-entropy), ``loss_box`` (smooth L1, beta 1/9, positives) and ``loss_mask``
        (per-pixel BCE of the object's class channel against its mask RoIAligned on the proposal)."""
        boxes, labels, deltas, pos_boxes, pos_labels, pos_gt = [], [], [], [], [], []
        for props, t in zip(proposals, targets):
            gt, gt_labels = t["boxes"], t["labels"] + 1
            props = torch.cat([props, gt])  # the ground truth is always among the candidates
            m = match_boxes(gt, props, self.fg_iou, self.fg_iou, allow_low_quality=False)
            lab = gt_labels[m.clamp(min=0)] if gt.numel() else torch.zeros_like(m)
            lab = torch.where(m == BELOW, torch.zeros_like(lab), lab)
            pos, neg = sample_balanced(lab, self.batch_size_per_image, self.positive_fraction, generator)
            idx = torch.cat([pos, neg])
            boxes.append(props[idx])
            labels.append(torch.cat([lab[pos], torch.zeros_like(lab[neg])]))
            deltas.append(self.coder.encode(gt[m[pos]], props[pos]))
            pos_boxes.append(props[pos])
            pos_labels.append(lab[pos])
            pos_gt.append(m[pos])
        logits, pred = self.box_head(self.pool(maps, strides, boxes, self.box_pool))
        labels_t = torch.cat(labels)
        n = max(len(labels_t), 1)
        losses = {"loss_cls": F.cross_entropy(logits.float(), labels_t)}
        fg = torch.nonzero(labels_t > 0).flatten()
        fg_pred = pred[fg, labels_t[fg] - 1].float()  # (P, 4): the deltas of each positive's own class
        losses["loss_box"] = F.smooth_l1_loss(fg_pred, torch.cat(deltas), beta=1 / 9, reduction="sum") / n
        if self.mask_head is not None:
            losses["loss_mask"] = self.mask_loss(maps, strides, pos_boxes, pos_labels, pos_gt, targets)
        return losses

    def mask_loss(self, maps: Sequence[Tensor], strides: Sequence[float], boxes: Sequence[Tensor],
                  labels: Sequence[Tensor], matched: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> Tensor:
        assert self.mask_head is not None
        if sum(len(b) for b in boxes) == 0:
            return sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        logits = self.mask_head(self.pool(maps, strides, boxes, self.mask_pool))  # (P, C, M, M)
        size = logits.shape[-1]
        goal = []
        for b, m, t in zip(boxes, matched, targets):
            if len(b):
                rois = torch.cat([m[:, None].to(b.dtype), b], dim=1)  # (P_i, 5): the ground-truth mask index, box
                goal.append(roi_align(t["masks"][:, None].float(), rois, size, 1.0, sampling_ratio=0,
                                      aligned=True)[:, 0])  # (P_i, M, M)
        lab = torch.cat(labels) - 1
        own = logits[torch.arange(len(lab), device=lab.device), lab].float()  # (P, M, M)
        return F.binary_cross_entropy_with_logits(own, torch.cat(goal))

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, maps: Sequence[Tensor], strides: Sequence[float], proposals: Sequence[Tensor],
               image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Per image: ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) in ``0..C-1`` and, with the
        mask head, ``masks`` (D, H, W) probabilities pasted into the input image."""
        logits, pred = self.box_head(self.pool(maps, strides, proposals, self.box_pool))
        out = self.postprocess(logits, pred, proposals, image_size)
        if self.mask_head is not None:
            self.add_masks(maps, strides, out, image_size)
        return out

    def postprocess(self, logits: Tensor, pred: Tensor, proposals: Sequence[Tensor],
                    image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Class logits (K, C + 1) and deltas (K, C, 4) of the proposals -> per image the boxes (decoded
        per class, clipped), scores > ``score_threshold``, boxes of side >= 0.01, NMS per class, the
        best ``detections_per_image``."""
        probs = logits.float().softmax(-1)[:, 1:]  # (K, C) without the background
        boxes_all = clip_boxes(self.coder.decode(pred.float(), torch.cat(proposals)), image_size)  # (K, C, 4)
        out, start = [], 0
        for props in proposals:
            k = len(props)
            sc, bx = probs[start:start + k], boxes_all[start:start + k]
            start += k
            labels = torch.arange(self.num_classes, device=sc.device).expand_as(sc)
            sc, bx, labels = sc.reshape(-1), bx.reshape(-1, 4), labels.reshape(-1)
            wh = bx[:, 2:] - bx[:, :2]
            keep = torch.nonzero((sc > self.score_threshold) & (wh >= 1e-2).all(1)).flatten()
            sc, bx, labels = sc[keep], bx[keep], labels[keep]
            keep = batched_nms(bx, sc, labels, self.nms_threshold)[: self.detections_per_image]
            out.append({"boxes": bx[keep], "scores": sc[keep], "labels": labels[keep]})
        return out

    def add_masks(self, maps: Sequence[Tensor], strides: Sequence[float], dets: list[dict[str, Tensor]],
                  image_size: tuple[int, int]) -> None:
        assert self.mask_head is not None
        boxes = [d["boxes"] for d in dets]
        if sum(len(b) for b in boxes) == 0:
            for d in dets:
                d["masks"] = maps[0].new_zeros(0, *image_size)
            return
        logits = self.mask_head(self.pool(maps, strides, boxes, self.mask_pool))  # (D, C, M, M)
        labels = torch.cat([d["labels"] for d in dets])
        probs = logits[torch.arange(len(labels), device=labels.device), labels].float().sigmoid()  # (D, M, M)
        start = 0
        for d in dets:
            k = len(d["boxes"])
            d["masks"] = paste_masks_in_image(probs[start:start + k, None], d["boxes"], image_size)[:, 0]
            start += k


__all__ = ["BoxHead", "MaskHead", "RoIHeads", "pool_rois"]
