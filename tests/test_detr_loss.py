"""Hungarian matching and the DETR loss against Hugging Face's DETR loss on the same random data.

transformers' ``loss_for_object_detection`` (a copy of facebookresearch/detr's matcher and
criterion) is the reference; it is a dev dependency, so these tests skip without it.
"""

import pytest
import torch
import torch.nn.functional as F

from vitlab.tasks.detection import DETRLoss, HungarianMatcher



def hf_loss_module():
    """``transformers.loss.loss_for_object_detection``, or a skip of the calling test only (the rest of the file needs no transformers)."""
    return pytest.importorskip("transformers.loss.loss_for_object_detection")


NUM_CLASSES = 5


def _random_case(seed, batch=4, queries=9, layers=3, counts=(3, 0, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    outputs = [
        {
            "logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=g) * 2,
            "boxes": torch.rand(batch, queries, 4, generator=g) * 0.6 + 0.2,
        }
        for _ in range(layers)
    ]
    targets = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return outputs, targets


def _hf_inputs(outputs, targets):
    hf_out = {"logits": outputs[-1]["logits"], "pred_boxes": outputs[-1]["boxes"]}
    hf_out["auxiliary_outputs"] = [{"logits": o["logits"], "pred_boxes": o["boxes"]} for o in outputs[:-1]]
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    return hf_out, hf_targets


@pytest.mark.parametrize("costs", [(1.0, 5.0, 2.0), (2.0, 1.0, 0.5), (0.0, 1.0, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matching_equals_huggingface(costs, seed):
    outputs, targets = _random_case(seed)
    ours = HungarianMatcher(*costs)(outputs[-1]["logits"], outputs[-1]["boxes"], targets)
    hf_out, hf_targets = _hf_inputs(outputs, targets)
    ref = hf_loss_module().HungarianMatcher(class_cost=costs[0], bbox_cost=costs[1], giou_cost=costs[2])(hf_out, hf_targets)
    for (qi, ti), (rq, rt) in zip(ours, ref):
        assert qi.tolist() == rq.tolist() and ti.tolist() == rt.tolist()


def test_matcher_defaults_are_detr_costs():
    m = HungarianMatcher()
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (1.0, 5.0, 2.0)
    loss = DETRLoss(NUM_CLASSES)
    assert loss.eos_coef == 0.1 and loss.weights == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_matcher_solves_one_block_per_image(monkeypatch):
    import vitlab.tasks.detection.matcher as matcher_mod

    from scipy.optimize import linear_sum_assignment

    shapes = []

    def spy():
        def solve(cost):
            shapes.append(cost.shape)
            return linear_sum_assignment(cost)

        return solve

    monkeypatch.setattr(matcher_mod, "_linear_sum_assignment", spy)
    outputs, targets = _random_case(0)
    HungarianMatcher()(outputs[-1]["logits"], outputs[-1]["boxes"], targets)
    assert shapes == [(9, 3), (9, 5), (9, 1)]  # the image without targets needs no solve


@pytest.mark.parametrize("seed", [0, 3])
def test_loss_equals_huggingface_on_every_layer(seed):
    outputs, targets = _random_case(seed)
    ours = DETRLoss(NUM_CLASSES)(outputs, targets)
    hf_out, hf_targets = _hf_inputs(outputs, targets)
    matcher = hf_loss_module().HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    ref = hf_loss_module().ImageLoss(matcher, num_classes=NUM_CLASSES, eos_coef=0.1, losses=["labels", "boxes"])(hf_out, hf_targets)
    names = [f"{n}{s}" for s in ("", "_0", "_1") for n in ("loss_ce", "loss_bbox", "loss_giou")]
    assert set(ours) == set(names) | {"loss"}
    for name in names:
        assert ours[name].item() == pytest.approx(ref[name].item(), rel=1e-5, abs=1e-6), name
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    total = sum(weights[n.rsplit("_", 1)[0] if n[-1].isdigit() else n] * ref[n] for n in names)
    assert ours["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_loss_options_equal_huggingface_with_the_same_options():
    outputs, targets = _random_case(5)
    matcher = HungarianMatcher(2.0, 1.0, 3.0)
    ours = DETRLoss(NUM_CLASSES, matcher=matcher, eos_coef=0.4, weight_ce=2.0, weight_bbox=1.0, weight_giou=0.5)(
        outputs, targets
    )
    hf_out, hf_targets = _hf_inputs(outputs, targets)
    ref_matcher = hf_loss_module().HungarianMatcher(class_cost=2, bbox_cost=1, giou_cost=3)
    ref = hf_loss_module().ImageLoss(ref_matcher, num_classes=NUM_CLASSES, eos_coef=0.4, losses=["labels", "boxes"])(
        hf_out, hf_targets
    )
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_1", "loss_giou_0"):
        assert ours[name].item() == pytest.approx(ref[name].item(), rel=1e-5, abs=1e-6), name
    final = 2.0 * ref["loss_ce"] + 1.0 * ref["loss_bbox"] + 0.5 * ref["loss_giou"]
    no_aux = DETRLoss(NUM_CLASSES, matcher=matcher, eos_coef=0.4, weight_ce=2.0, weight_bbox=1.0, weight_giou=0.5,
                      aux_loss=False)(outputs, targets)
    assert set(no_aux) == {"loss_ce", "loss_bbox", "loss_giou", "loss"}
    assert no_aux["loss"].item() == pytest.approx(final.item(), rel=1e-5)


def test_loss_without_any_target_is_no_object_cross_entropy():
    outputs, _ = _random_case(2, batch=2)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    out = DETRLoss(NUM_CLASSES)(outputs[-1], targets)
    # every query's target is no-object: the weighted mean is the plain mean of -log p(no-object)
    expected = -F.log_softmax(outputs[-1]["logits"], -1)[..., NUM_CLASSES].mean()
    assert out["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss_bbox"].item() == 0.0 and out["loss_giou"].item() == 0.0


def test_nan_prediction_is_matched_last_and_does_not_crash():
    outputs, targets = _random_case(4, batch=1, queries=4, counts=(2,))
    boxes = outputs[-1]["boxes"].clone()
    boxes[0, 1] = float("nan")
    q, _ = HungarianMatcher()(outputs[-1]["logits"], boxes, targets)[0]
    assert len(q) == 2 and 1 not in q.tolist()


def test_loss_gradients_reach_logits_and_boxes():
    outputs, targets = _random_case(6, layers=2)
    for o in outputs:
        o["logits"].requires_grad_(True)
        o["boxes"].requires_grad_(True)
    DETRLoss(NUM_CLASSES)(outputs, targets)["loss"].backward()
    for o in outputs:  # the auxiliary layer gets gradients too
        assert o["logits"].grad.abs().sum() > 0 and o["boxes"].grad.abs().sum() > 0


def test_bad_labels_and_shapes_give_one_clear_error():
    outputs, targets = _random_case(0)
    targets[0]["labels"][0] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 5\)"):
        DETRLoss(NUM_CLASSES)(outputs, targets)
    _, targets = _random_case(0)
    with pytest.raises(ValueError, match="3 classes \\+ no-object = 4 channels, got 6"):
        DETRLoss(3)(outputs, [{"labels": t["labels"].clamp(max=2), "boxes": t["boxes"]} for t in targets])
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0, 0, 0)
