"""Semantic segmentation: heads, losses, metrics, inference at any size, SegFormer import."""

from .heads import (
    AllMlpHead,
    AttentionUpsample,
    FpnHead,
    Segmenter,
    SetrMlaHead,
    SetrUpHead,
    backbone_intermediates,
    feature_channels_strides,
)
from .inference import predict_sliding, predict_tta, predict_whole
from .losses import SegmentationLoss, dice_loss
from .metrics import SegmentationMetrics

__all__ = [
    "AllMlpHead", "AttentionUpsample", "FpnHead", "Segmenter", "SetrMlaHead", "SetrUpHead",
    "backbone_intermediates", "feature_channels_strides", "predict_sliding", "predict_tta", "predict_whole",
    "SegmentationLoss", "dice_loss", "SegmentationMetrics",
]
