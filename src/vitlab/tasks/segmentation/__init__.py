"""Semantic segmentation: heads, losses, metrics, inference at any size, SegFormer import, the
training task (``task: segmentation``, :mod:`.task`) and its checkpoints (:mod:`.model`)."""

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
from .model import SegmentationModel, SegmenterConfig, build_segmenter, load_segmenter

__all__ = [
    "AllMlpHead", "AttentionUpsample", "FpnHead", "Segmenter", "SetrMlaHead", "SetrUpHead",
    "backbone_intermediates", "feature_channels_strides", "predict_sliding", "predict_tta", "predict_whole",
    "SegmentationLoss", "dice_loss", "SegmentationMetrics", "SegmentationModel", "SegmenterConfig",
    "build_segmenter", "load_segmenter",
]
