"""Box ops and DETR post-processing against hand-computed values and edge cases."""

import math

import pytest
import torch

from vitlab.tasks.detection import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    normalize_boxes,
    postprocess_detections,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_format_conversions_hand_values():
    assert torch.allclose(box_cxcywh_to_xyxy(t([0.5, 0.5, 0.2, 0.4])), t([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(box_xyxy_to_cxcywh(t([0.4, 0.3, 0.6, 0.7])), t([0.5, 0.5, 0.2, 0.4]))
    assert torch.equal(box_xywh_to_xyxy(t([10, 20, 5, 7])), t([10, 20, 15, 27]))
    assert torch.equal(box_xyxy_to_xywh(t([10, 20, 15, 27])), t([10, 20, 5, 7]))
    # normalised for DETR: (h, w) = (64, 128)
    assert torch.allclose(normalize_boxes(t([16, 8, 48, 40]), (64, 128)), t([0.25, 0.375, 0.25, 0.5]))


def test_iou_and_giou_hand_values():
    a = t([0, 0, 2, 2])
    b = t([1, 1, 3, 3], [2, 0, 3, 1], [0, 0, 2, 2], [0, 0, 4, 4])
    iou, union = box_iou(a, b)
    # overlap 1 of union 7; disjoint; identical; a inside a 4x4 box
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1.0, 4 / 16]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0, 4.0, 16.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9 (union 7); 3x2 = 6 (union 5); the box itself; 4x4 (union 16)
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 0 - 1 / 6, 1.0, 0.25]]))
    far = generalized_box_iou(t([0, 0, 1, 1]), t([9, 9, 10, 10]))
    assert far.item() == pytest.approx(0 - (100 - 2) / 100)


def test_degenerate_and_empty_boxes():
    line = t([1, 0, 1, 2])  # zero width
    point = t([1, 1, 1, 1])
    iou, _ = box_iou(line, t([0, 0, 2, 2]))
    assert iou.item() == 0.0
    # enclosing 2x2 = 4, union 4: no penalty; against a far box the penalty counts
    assert generalized_box_iou(line, t([0, 0, 2, 2])).item() == 0.0
    assert generalized_box_iou(line, t([3, 0, 4, 2])).item() == pytest.approx(-(6 - 2) / 6)
    same = generalized_box_iou(point, point)
    assert same.item() == 0.0 and not math.isnan(same.item())
    empty = torch.zeros(0, 4)
    assert box_iou(empty, t([0, 0, 1, 1], [0, 0, 2, 2]))[0].shape == (0, 2)
    assert generalized_box_iou(t([0, 0, 1, 1]), empty).shape == (1, 0)
    with pytest.raises(ValueError, match="inverted"):
        generalized_box_iou(t([2, 0, 1, 1]), t([0, 0, 1, 1]))


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_postprocess_scores_threshold_topk_and_pixels():
    # two object classes + no-object (last)
    logits = _logits([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.05, 0.9, 0.05]]])
    boxes = torch.tensor([[[0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 0.1, 0.1], [0.5, 0.25, 0.5, 0.5]]])
    (out,) = postprocess_detections(logits, boxes, [(40, 80)], score_threshold=0.5)
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.7]))
    assert out["labels"].tolist() == [1, 0]
    # (h, w) = (40, 80): x scales by 80, y by 40
    assert torch.allclose(out["boxes"], t([20, 0, 60, 20], [0, 0, 40, 40]))
    (top,) = postprocess_detections(logits, boxes, [(40, 80)], top_k=1)
    assert top["labels"].tolist() == [1] and torch.allclose(top["scores"], torch.tensor([0.9]))
    # the no-object probability (0.6 on query 1) is never a score
    (all_,) = postprocess_detections(logits, boxes, [(40, 80)])
    assert torch.allclose(all_["scores"], torch.tensor([0.9, 0.7, 0.3]))
    (none,) = postprocess_detections(logits, boxes, [(40, 80)], score_threshold=0.95)
    assert none["boxes"].shape == (0, 4) and none["scores"].numel() == 0 and none["labels"].numel() == 0


def test_postprocess_clips_boxes_to_the_image():
    logits = _logits([[[0.9, 0.1]]])
    boxes = torch.tensor([[[0.05, 0.95, 0.2, 0.2]]])
    (out,) = postprocess_detections(logits, boxes, torch.tensor([[10, 20]]))
    assert torch.allclose(out["boxes"], t([0, 8.5, 3, 10]))
