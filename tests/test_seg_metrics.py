"""Segmentation loss and metrics against hand-computed values and torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.tasks.segmentation import SegmentationLoss, SegmentationMetrics, dice_loss

IGN = 255


def _case():
    # 4 classes; class 3 appears nowhere; one ignored pixel whose prediction is wrong.
    target = torch.tensor([[[0, 0, 1], [1, 2, IGN]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    return pred, target


def test_confusion_matrix_and_iou_by_hand() -> None:
    pred, target = _case()
    m = SegmentationMetrics(4, ignore_index=IGN)
    m.update(pred, target)
    # rows = target, cols = prediction; the ignored pixel (pred 2) is not counted
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(m.confusion, expected)
    r = m.compute()
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0 -> 0; class 3 absent -> NaN
    iou = r["per_class_iou"]
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)  # absent class left out of the mean
    assert r["pixel_accuracy"] == pytest.approx(3 / 5)


def test_accumulates_over_batches_and_accepts_logits() -> None:
    pred, target = _case()
    one = SegmentationMetrics(4)
    one.update(torch.cat([pred, pred]), torch.cat([target, target]))
    two = SegmentationMetrics(4)
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).float()  # (B, H, W, K) -> (B, K, H, W)
    two.update(logits, target)
    two.update(pred, target)
    assert torch.equal(one.confusion, two.confusion)
    assert torch.equal(one.confusion, 2 * torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]))


def test_unknown_label_is_one_clear_error() -> None:
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="target label 7 is outside 0..2"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 2]]]))


def test_agrees_with_torchmetrics() -> None:
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    k = 6
    target = torch.randint(0, k - 1, (3, 17, 13), generator=g)  # class k-1 never in the target
    target[torch.rand(target.shape, generator=g) < 0.1] = IGN
    pred = torch.randint(0, k - 2, (3, 17, 13), generator=g)  # classes k-2, k-1 never predicted
    ours = SegmentationMetrics(k, ignore_index=IGN)
    ours.update(pred, target)
    r = ours.compute()
    ref_cm = tm.MulticlassConfusionMatrix(k, ignore_index=IGN)(pred, target)
    assert torch.equal(ours.confusion, ref_cm)
    per_class = tm.MulticlassJaccardIndex(k, average="none", ignore_index=IGN)(pred, target)
    present = ~torch.isnan(torch.tensor(r["per_class_iou"]))
    torch.testing.assert_close(torch.tensor(r["per_class_iou"], dtype=torch.float64)[present], per_class[present].double())
    assert int(present.sum()) == k - 1  # the class absent from both is NaN, not 0
    # torchmetrics' macro average counts only classes seen in target or prediction, as ours
    miou = tm.MulticlassJaccardIndex(k, average="macro", ignore_index=IGN)(pred, target)
    assert r["mIoU"] == pytest.approx(float(miou), abs=1e-6)
    acc = tm.MulticlassAccuracy(k, average="micro", ignore_index=IGN)(pred, target)
    assert r["pixel_accuracy"] == pytest.approx(float(acc), abs=1e-6)


def test_cross_entropy_ignores_ignore_index() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[0, 0] = IGN
    loss = SegmentationLoss(ignore_index=IGN)(logits, target)
    # explicit: mean over valid pixels of -log softmax at the target class
    logp = logits.log_softmax(1).permute(0, 2, 3, 1).reshape(-1, 3)  # (B, K, H, W) -> (B*H*W, K)
    t = target.reshape(-1)
    valid = t != IGN
    ref = -logp[valid].gather(1, t[valid, None]).mean()
    torch.testing.assert_close(loss, ref)
    # logits at ignored pixels do not matter
    changed = logits.clone()
    changed[0, :, 0] = 100.0 * torch.randn(3, 5, generator=g)
    torch.testing.assert_close(SegmentationLoss(ignore_index=IGN)(changed, target), loss)


def test_dice_by_hand() -> None:
    # 2 classes, 2 valid pixels + 1 ignored; probabilities (0.8, 0.2) and (0.25, 0.75)
    logits = torch.log(torch.tensor([[0.8, 0.25, 0.5], [0.2, 0.75, 0.5]]))[None, :, None, :]  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 0, IGN]]])
    # class 0: inter 0.8 + 0.25, sums 1.05 + 2; class 1: inter 0, sums 0.95 + 0
    d0 = 1 - (2 * 1.05 + 1) / (3.05 + 1)
    d1 = 1 - (0 + 1) / (0.95 + 1)
    assert float(dice_loss(logits, target, IGN, eps=1.0)) == pytest.approx((d0 + d1) / 2, abs=1e-6)
    ce_only = SegmentationLoss(ignore_index=IGN)(logits, target)
    both = SegmentationLoss(ignore_index=IGN, dice_weight=0.5)(logits, target)
    assert float(both - ce_only) == pytest.approx(0.5 * (d0 + d1) / 2, abs=1e-6)


def test_all_ignored_gives_zero_loss_with_graph() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss()(logits, torch.full((1, 2, 2), IGN))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
