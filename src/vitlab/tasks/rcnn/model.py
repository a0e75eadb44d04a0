"""Mask R-CNN (He et al., 2017) on any vitlab backbone, ViTDet-style on a plain ViT (Li et al., 2022).

``backbone -> pyramid (simple on a plain ViT, FPN on Swin / PVT) -> RPN -> RoI heads``. In
training (``targets`` given) the model returns its losses; in eval mode the detections of every
image (``boxes`` xyxy in input pixels, ``scores``, ``labels`` in ``0..C-1`` and ``masks``: (D, H, W)
probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...config import build_config
from .neck import BackbonePyramid
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Configuration of :class:`MaskRCNN`.

    Attributes:
        backbone: A registered model name (``vitlab models``).
        backbone_overrides: Keyword overrides of the backbone. ViTDet on a ViT:
            ``class_token=False, pool="mean", window_size=14, global_blocks=(2, 5, 8, 11), rel_pos="decomposed"``.
        image_size: Input side in pixels.
        in_channels: Input channels.
        num_classes: Object classes (background excluded).
        masks: Mask R-CNN (True) or Faster R-CNN (False).
        fpn_dim: Channels of every pyramid level (256).
        pyramid_scales: Plain ViTs: the simple pyramid's scale factors ((4, 2, 1, 0.5)).
        norm: LayerNorm in the pyramid and head convolutions (ViTDet: on).
        anchor_scale: Anchor side = ``anchor_scale`` x the level's stride (8: 32 px on stride 4).
        aspect_ratios: Anchor height / width ratios.
        rpn_head_depth: 3x3 convolutions of the RPN head (ViTDet: 2).
        rpn_pre_nms_top_n, rpn_post_nms_top_n: (train, test) proposals kept per level before NMS /
            per image after it.
        rpn_batch_size: Anchors sampled per image for the RPN loss.
        roi_batch_size: Proposals sampled per image for the box / mask losses.
        roi_positive_fraction: Most positives among them.
        conv_dim, box_convs, fc_dim, mask_convs: Head widths and depths (4conv1fc; 4 mask convs).
        box_pool, mask_pool: Pooled RoI sides (7; 14).
        canonical_scale, canonical_level: A box of ``canonical_scale`` pixels is pooled on the
            level of stride ``2**canonical_level``.
        score_threshold, nms_threshold, detections_per_image: Inference filtering.
        backbone_lr_scale: Learning-rate factor of the backbone's parameters.
    """

    backbone: str = "vit_base_patch16_224"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 1024
    in_channels: int = 3
    num_classes: int = 80
    masks: bool = True
    fpn_dim: int = 256
    pyramid_scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    norm: bool = True
    anchor_scale: float = 8.0
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_head_depth: int = 2
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)
    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000)
    rpn_batch_size: int = 256
    roi_batch_size: int = 512
    roi_positive_fraction: float = 0.25
    conv_dim: int = 256
    box_convs: int = 4
    fc_dim: int = 1024
    mask_convs: int = 4
    box_pool: int = 7
    mask_pool: int = 14
    canonical_scale: float = 224.0
    canonical_level: int = 4
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("pyramid_scales", "aspect_ratios", "rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [n for n in ("image_size", "in_channels", "num_classes", "fpn_dim", "conv_dim", "fc_dim", "box_pool",
                           "mask_pool", "rpn_batch_size", "roi_batch_size") if int(getattr(self, n)) <= 0]
        if bad:
            raise ValueError(f"MaskRCNNConfig: {', '.join(bad)} must be positive")
        if not 0 < self.roi_positive_fraction <= 1:
            raise ValueError(f"roi_positive_fraction must be in (0, 1], got {self.roi_positive_fraction}")


class MaskRCNN(nn.Module):
    """Mask R-CNN on a vitlab backbone (see the module docstring).

    Args:
        config: A :class:`MaskRCNNConfig`; keyword arguments override its fields.
        backbone: An already built backbone (e.g. pretrained weights); default: built from the config.

    Example:
        >>> cfg = MaskRCNNConfig(backbone="vit_tiny_patch16_224", image_size=64, in_channels=1, num_classes=3,
        ...     backbone_overrides=dict(patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, class_token=False,
        ...     pool="mean"), fpn_dim=16, conv_dim=16, fc_dim=32)
        >>> dets = MaskRCNN(cfg).eval()(torch.rand(1, 1, 64, 64))
        >>> sorted(dets[0])
        ['boxes', 'labels', 'masks', 'scores']
    """

    family = "MaskRCNN"

    def __init__(self, config: MaskRCNNConfig | None = None, backbone: nn.Module | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(MaskRCNNConfig, vars(config) if config is not None else {}, **overrides)
        self.config = c = config
        if backbone is None:
            from ...pretrained import create_model

            backbone = create_model(c.backbone, num_classes=0, in_channels=c.in_channels, image_size=c.image_size,
                                    **dict(c.backbone_overrides))
        self.features = BackbonePyramid(backbone, c.fpn_dim, c.pyramid_scales, c.norm)
        strides = self.features.strides
        self.rpn = RegionProposalNetwork(
            c.fpn_dim, [(c.anchor_scale * s,) for s in strides], c.aspect_ratios, c.rpn_head_depth,
            c.rpn_pre_nms_top_n, c.rpn_post_nms_top_n, batch_size_per_image=c.rpn_batch_size)
        self.roi_heads = RoIHeads(
            c.fpn_dim, c.num_classes, c.box_pool, c.mask_pool, c.masks, c.conv_dim, c.box_convs, c.fc_dim, c.mask_convs,
            c.norm, c.roi_batch_size, c.roi_positive_fraction, score_threshold=c.score_threshold,
            nms_threshold=c.nms_threshold, detections_per_image=c.detections_per_image,
            canonical_scale=c.canonical_scale, canonical_level=c.canonical_level)
        self.pretrained_cfg: dict[str, Any] = {}

    @property
    def backbone(self) -> nn.Module:
        """The backbone (any vitlab model of the contract)."""
        return self.features.backbone

    def no_weight_decay(self) -> set[str]:
        """The backbone's own (position embeddings, tokens, bias tables)."""
        return {f"features.backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factor of the backbone (``backbone_lr_scale``)."""
        return {"features.backbone.": self.config.backbone_lr_scale}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: Tensor, targets: Sequence[dict[str, Tensor]] | None = None,
                generator: torch.Generator | None = None) -> Any:
        """Training (``targets``: per image ``boxes`` (n, 4) pixels, ``labels`` (n,) in ``0..C-1`` and,
        with masks, ``masks`` (n, H, W)): the losses (``loss`` is their sum). Otherwise the detections.

        Args:
            images: Normalised images (B, C, H, W).
            targets: The ground truth of every image (training).
            generator: Draws the RPN's and the RoI heads' samples (training).
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        maps = self.features(images)
        strides = self.features.strides
        if targets is not None:
            self.check_targets(targets, size)
            proposals, losses = self.rpn(maps, strides, size, targets, generator)
            losses.update(self.roi_heads.loss(maps[:-1], strides[:-1], proposals, targets, generator))
            losses["loss"] = sum(losses.values())
            return losses
        proposals, _ = self.rpn(maps, strides, size)
        return self.roi_heads.detect(maps[:-1], strides[:-1], proposals, size)

    def check_targets(self, targets: Sequence[dict[str, Tensor]], size: tuple[int, int]) -> None:
        for i, t in enumerate(targets):
            boxes, labels = t["boxes"], t["labels"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
                raise ValueError(f"target {i}: expected boxes (n, 4) and labels (n,), got {tuple(boxes.shape)} and "
                                 f"{tuple(labels.shape)}")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.config.num_classes):
                raise ValueError(f"target {i}: labels must be in 0..{self.config.num_classes - 1}, got "
                                 f"{labels.unique().tolist()}")
            if self.config.masks and tuple(t["masks"].shape) != (len(boxes), *size):
                raise ValueError(f"target {i}: expected masks (n, H, W) = ({len(boxes)}, {size[0]}, {size[1]}), got "
                                 f"{tuple(t['masks'].shape)}")


__all__ = ["MaskRCNN", "MaskRCNNConfig"]
