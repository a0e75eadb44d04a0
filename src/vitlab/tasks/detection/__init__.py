"""Object detection (DETR-style): box operations, Hungarian matching, the set loss,
post-processing, COCO evaluation, DETR (with DN-DETR denoising) and YOLOS, and the
``detection`` task of the engine (:mod:`.task`). Nothing here imports the training engine."""

from .box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    normalize_boxes,
)
from .denoising import DenoisingQueries, build_denoising_queries, denoising_attention_mask, denoising_losses
from .detr import DETR, DETRConfig, SimpleFeaturePyramid, sine_position_encoding_2d
from .coco_eval import COCO_METRICS, CocoEvaluator, detections_to_coco_results, evaluate_coco
from .losses import DETRLoss
from .matcher import HungarianMatcher
from .postprocess import postprocess_detections

__all__ = [
    "COCO_METRICS", "CocoEvaluator", "DETR", "DETRConfig", "DETRLoss", "DenoisingQueries", "SimpleFeaturePyramid",
    "build_denoising_queries", "denoising_attention_mask", "denoising_losses", "sine_position_encoding_2d", "HungarianMatcher", "box_area", "box_cxcywh_to_xyxy", "box_iou",
    "box_xywh_to_xyxy", "box_xyxy_to_cxcywh", "box_xyxy_to_xywh", "detections_to_coco_results", "evaluate_coco",
    "generalized_box_iou", "normalize_boxes", "postprocess_detections",
]
