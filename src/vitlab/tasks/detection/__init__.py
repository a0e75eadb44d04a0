"""Object detection (DETR-style): box operations, Hungarian matching, the set loss,
post-processing and COCO evaluation. Nothing here imports the training engine."""

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
from .coco_eval import COCO_METRICS, CocoEvaluator, detections_to_coco_results, evaluate_coco
from .losses import DETRLoss
from .matcher import HungarianMatcher
from .postprocess import postprocess_detections

__all__ = [
    "COCO_METRICS", "CocoEvaluator", "DETRLoss", "HungarianMatcher", "box_area", "box_cxcywh_to_xyxy", "box_iou",
    "box_xywh_to_xyxy", "box_xyxy_to_cxcywh", "box_xyxy_to_xywh", "detections_to_coco_results", "evaluate_coco",
    "generalized_box_iou", "normalize_boxes", "postprocess_detections",
]
