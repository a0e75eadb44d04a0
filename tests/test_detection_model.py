"""DETR on the backbone contract: sine positions, the simple feature pyramid and stages
(multi-scale memory), auxiliary outputs, and DN-DETR's denoising mechanics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.components import Attention, CrossAttention
from vitlab.tasks.detection import box_cxcywh_to_xyxy, generalized_box_iou
from vitlab.tasks.detection.denoising import (
    build_denoising_queries,
    denoising_attention_mask,
    denoising_losses,
)
from vitlab.tasks.detection.detr import DETR, DETRConfig, box_sine_embedding, inverse_sigmoid, sine_position_encoding_2d

VIT = dict(patch_size=8, dim=32, depth=1, heads=2, mlp_dim=64)


def tiny(**kw) -> DETR:
    torch.manual_seed(0)
    base = dict(backbone_overrides=VIT, image_size=32, dim=32, heads=2, mlp_dim=64, num_queries=5,
                enc_layers=1, dec_layers=3)
    base.update(kw)
    return DETR(DETRConfig(**base))


def test_sine_position_encoding_is_detrs_formula_by_hand():
    pos = sine_position_encoding_2d(2, 3, 8)  # npf = 4, dim_t = [1, 1, 100, 100]
    assert pos.shape == (6, 8)
    # row 0 -> y = 1/2 * 2pi = pi ; column 1 -> x = 2/3 * 2pi
    y, x = math.pi, 4 * math.pi / 3
    expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    assert torch.allclose(pos[1], torch.tensor(expected), atol=1e-5)


def _memory_lengths(model: DETR, x: torch.Tensor) -> list[int]:
    seen = []
    hook = model.decoder[0].cross_attn.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["context"].shape[1]),
                                                             with_kwargs=True)
    model.eval()(x)
    hook.remove()
    return seen


def test_plain_vit_gets_a_simple_feature_pyramid_and_the_decoder_reads_every_level():
    model = tiny(pyramid_scales=(2.0, 1.0, 0.5))
    assert model.plain
    x = torch.rand(2, 1, 32, 32)
    maps = model.feature_levels(x)  # the ViT's stride-8 map (4x4) up x2, itself, down x2
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4), (2, 2)]
    assert _memory_lengths(model, x) == [64 + 16 + 4]


def test_hierarchical_backbone_uses_its_last_stages():
    torch.manual_seed(0)
    model = DETR(DETRConfig(backbone="pvt_v2_b0", image_size=64, dim=32, heads=2, mlp_dim=64, num_queries=4,
                            num_levels=3, dec_layers=1))
    assert not model.plain and model.indices == [1, 2, 3]
    x = torch.rand(1, 1, 64, 64)
    assert [tuple(m.shape[-2:]) for m in model.feature_levels(x)] == [(8, 8), (4, 4), (2, 2)]
    assert _memory_lengths(model, x) == [64 + 16 + 4]


def test_decoder_is_built_from_the_shared_attention_and_gives_an_output_per_layer():
    model = tiny(remedy="none").eval()
    for layer in model.decoder:
        assert isinstance(layer.self_attn, Attention) and isinstance(layer.cross_attn, CrossAttention)
    states = []
    for layer in model.decoder:
        layer.register_forward_hook(lambda m, a, out: states.append(out))
    out = model(torch.rand(2, 1, 32, 32))
    assert len(out["aux"]) == 2 and len(states) == 3
    for k, aux in enumerate(out["aux"] + [out]):
        h = model.dec_norm(states[k])
        assert torch.allclose(aux["logits"], model.class_head(h), atol=1e-6)
        assert torch.allclose(aux["boxes"], model.box_head(h).sigmoid(), atol=1e-6)


def test_denoising_attention_mask_by_hand():
    # 2 groups of 2 denoising queries, then 3 matching queries; True = blocked
    x, o = True, False
    expected = torch.tensor([
        [o, o, x, x, o, o, o],
        [o, o, x, x, o, o, o],
        [x, x, o, o, o, o, o],
        [x, x, o, o, o, o, o],
        [x, x, x, x, o, o, o],
        [x, x, x, x, o, o, o],
        [x, x, x, x, o, o, o],
    ])
    assert torch.equal(denoising_attention_mask(2, 2, 3), expected)


def _targets():
    return [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def test_matching_queries_cannot_see_the_denoising_queries():
    model = tiny(remedy="dn", dn_groups=3).train()
    x = torch.rand(2, 1, 32, 32)
    with_dn = model(x, _targets())
    assert with_dn["dn"] is not None and with_dn["dn"]["logits"].shape == (3, 2, 3 * 2, 11)
    without = model(x)
    assert without["dn"] is None
    torch.testing.assert_close(with_dn["logits"], without["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn["boxes"], without["boxes"], atol=1e-5, rtol=1e-5)
    # and a denoising group does not see the others: group 0 fed alone gives the same outputs
    three = with_dn["dn"]
    q = three["queries"]
    mem, _ = model.memory(x)
    for g in (0, 2):  # the first and the last group: neither sees another
        single = build_denoising_queries(_targets(), 10, 5, 1, 0.0, 0.0)
        single.labels, single.boxes = q.labels[:, 2 * g: 2 * g + 2], q.boxes[:, 2 * g: 2 * g + 2]
        logits, boxes = model.decode(mem, *model._queries(2, single))
        torch.testing.assert_close(logits[-1][:, :2], three["logits"][-1][:, 2 * g: 2 * g + 2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(boxes[-1][:, :2], three["boxes"][-1][:, 2 * g: 2 * g + 2], atol=1e-5, rtol=1e-5)


def test_denoising_queries_noise_within_dn_detr_bounds_and_padding():
    g = torch.Generator().manual_seed(0)
    q = build_denoising_queries(_targets(), 10, 5, groups=4, label_noise=0.0, box_noise=0.0, generator=g)
    assert q.num_queries == 8 and q.labels.shape == (2, 8)
    # image 1 has one object: slot 1 of every group is padding
    assert q.valid[1].tolist() == [True, False] * 4 and q.valid[0].all()
    assert torch.equal(q.labels[q.valid], q.target_labels[q.valid])
    assert torch.equal(q.boxes[q.valid], q.target_boxes[q.valid])
    lam = 0.4
    q = build_denoising_queries(_targets() * 50, 10, 5, groups=10, label_noise=0.5, box_noise=lam, generator=g)
    v = q.valid
    src, tgt = q.boxes[v], q.target_boxes[v]
    assert ((src[:, :2] - tgt[:, :2]).abs() <= lam * tgt[:, 2:] / 2 + 1e-6).all()
    ratio = src[:, 2:] / tgt[:, 2:]
    assert ((ratio >= 1 - lam - 1e-6) & (ratio <= 1 + lam + 1e-6)).all()
    assert (src != tgt).any(-1).float().mean() > 0.9
    flipped = (q.labels[v] != q.target_labels[v]).float().mean()
    assert 0.35 < flipped < 0.55  # p = 0.5 of drawing a class, 1/10 of it the same class


def test_denoising_loss_equals_a_hand_computation():
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    q = build_denoising_queries(targets, 3, 4, groups=2, label_noise=0.0, box_noise=0.0)
    logits = torch.tensor([[[0.0, 1.0, 2.0, 0.5], [1.0, 0.0, 0.0, 0.0]]])  # (B=1, D=2, 3 + 1)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]])
    out = denoising_losses(logits, boxes, q, num_boxes=1.0)
    ce = (-F.log_softmax(logits[0, 0], -1)[2] - F.log_softmax(logits[0, 1], -1)[2]) / 2
    # second box shifted by 0.1 in x: L1 0.1; IoU = 0.1*0.2 / (0.04 + 0.04 - 0.02) = 1/3, hull 0.3x0.2 = union 0.06
    l1 = 0.1 / 2
    giou = (0 + (1 - 1 / 3)) / 2
    assert out["loss_ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert out["loss_bbox"].item() == pytest.approx(l1, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(giou, abs=1e-6)
    ref = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0]), box_cxcywh_to_xyxy(q.target_boxes[0])).diag()
    assert (1 - ref).sum().item() / 2 == pytest.approx(giou, abs=1e-6)


def test_anchor_queries_are_refined_layer_by_layer():
    from vitlab.tasks.detection.detr import box_sine_embedding

    model = tiny(remedy="dn").eval()
    torch.nn.init.normal_(model.box_head[-1].weight)  # (zero at init: boxes would equal the anchors)
    seen = []
    model.decoder[1].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    out = model(torch.rand(2, 1, 32, 32))
    first = out["aux"][0]["boxes"]  # the first layer's boxes are the second layer's anchors
    torch.testing.assert_close(seen[0], model.box_pos(box_sine_embedding(first, 32)), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ Group DETR (one-to-many via query groups)
def test_group_attention_mask_by_hand():
    from vitlab.tasks.detection.detr import group_attention_mask

    x, o = True, False  # 3 groups of 2 queries; True = blocked
    expected = torch.tensor([
        [o, o, x, x, x, x],
        [o, o, x, x, x, x],
        [x, x, o, o, x, x],
        [x, x, o, o, x, x],
        [x, x, x, x, o, o],
        [x, x, x, x, o, o],
    ])
    assert torch.equal(group_attention_mask(3, 2), expected)


@pytest.mark.parametrize("remedy", ["none", "dn"])
def test_query_groups_do_not_see_each_other_and_inference_runs_the_first_group_only(remedy):
    model = tiny(remedy=remedy, query_groups=3)
    if remedy == "dn":  # zero at init: make the refined anchors depend on the queries' outputs
        torch.nn.init.normal_(model.box_head[-1].weight, std=0.1)
    x = torch.rand(2, 1, 32, 32)
    model.train()
    trained = model(x, _targets())
    assert len(trained["groups"]) == 2 and len(trained["groups"][0]) == 3  # groups 2 and 3, 3 layers each
    model.eval()
    alone = model(x)
    assert alone["groups"] == [] and alone["logits"].shape == (2, 5, 11)
    # group 1 in training (next to groups 2, 3 and, with DN, the denoising queries) == group 1 alone
    torch.testing.assert_close(trained["logits"], alone["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained["boxes"], alone["boxes"], atol=1e-5, rtol=1e-5)
    # group 3 == its own queries decoded alone (swap its parameters into group 1's slots)
    with torch.no_grad():
        if remedy == "dn":
            model.anchors[:5] = model.anchors[10:15].clone()
            model.query_content[:5] = model.query_content[10:15].clone()
        else:
            model.query_pos[:5] = model.query_pos[10:15].clone()
    third = model(x)
    torch.testing.assert_close(trained["groups"][1][-1]["logits"], third["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained["groups"][1][-1]["boxes"], third["boxes"], atol=1e-5, rtol=1e-5)
    for k, aux in enumerate(third["aux"]):
        torch.testing.assert_close(trained["groups"][1][k]["boxes"], aux["boxes"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ two-stage query selection
def test_proposal_anchors_by_hand():
    model = tiny(remedy="two_stage", proposal_cells=2.0)
    # a 2x2 level then a 1x1 level: cells of 1/2 and 1, anchors 2 cells wide (clamped to the image)
    expected = torch.tensor([[0.25, 0.25, 1.0, 1.0], [0.75, 0.25, 1.0, 1.0],
                             [0.25, 0.75, 1.0, 1.0], [0.75, 0.75, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(model.proposal_anchors([(2, 2), (1, 1)]), expected)
    model = tiny(remedy="two_stage", proposal_cells=1.5)
    anchors = model.proposal_anchors([(1, 4)])  # one row of 4 cells: x centres 1/8, 3/8, ...; w = 1.5/4, h = 1
    torch.testing.assert_close(anchors[:, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(anchors[:, 2:], torch.tensor([[0.375, 1.0]]).expand(4, 2))


@pytest.mark.parametrize("remedy", ["two_stage", "dn_two_stage"])
def test_two_stage_decoder_anchors_are_the_top_scoring_proposals(remedy):
    model = tiny(remedy=remedy, num_queries=3, pyramid_scales=(1.0, 0.5)).eval()
    torch.nn.init.normal_(model.enc_box_head[-1].weight, std=0.5)  # proposals move off their anchors
    torch.nn.init.normal_(model.enc_class_head.weight, std=0.5)
    x = torch.rand(2, 1, 32, 32)
    seen = []
    model.decoder[0].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    out = model(x)
    enc = out["enc"]
    assert enc["logits"].shape == (2, 16 + 4, 11) and enc["boxes"].shape == (2, 20, 4)
    # by hand: object score = 1 - p(no-object); the three best tokens of each image, best first
    p_obj = 1 - enc["logits"].detach().softmax(-1)[..., -1]
    for i in range(2):
        order = sorted(range(20), key=lambda n: -float(p_obj[i, n]))[:3]
        chosen = enc["boxes"][i, order]
        # the first decoder layer's query positions are the embedding of those boxes
        torch.testing.assert_close(seen[0][i], model.box_pos(box_sine_embedding(chosen, 32)), atol=1e-6, rtol=1e-6)
        # the decoder's box head is zero at init: its boxes are its anchors
        torch.testing.assert_close(out["boxes"][i], chosen, atol=1e-6, rtol=1e-6)
    # and each proposal is an offset of its token's fixed anchor (logit space)
    mem, grids = model.memory(x)
    h = model.enc_output(mem)
    expected = (model.enc_box_head(h) + inverse_sigmoid(model.proposal_anchors(grids))).sigmoid()
    torch.testing.assert_close(enc["boxes"], expected)


def test_two_stage_selection_passes_no_gradient_to_the_proposals():
    model = tiny(remedy="two_stage", num_queries=3)
    torch.nn.init.normal_(model.box_head[-1].weight, std=0.1)
    out = model.train()(torch.rand(2, 1, 32, 32))
    out["boxes"].sum().backward()  # a decoder-only loss: the selected anchors are detached
    assert model.enc_box_head[-1].weight.grad is None or not model.enc_box_head[-1].weight.grad.any()
    assert model.box_head[-1].weight.grad.abs().sum() > 0


def test_backbone_learning_rate_scale_reaches_the_optimizer():
    from vitlab.training.optim import build_optimizer

    model = tiny(backbone_lr_scale=0.1)
    opt = build_optimizer(model, lr=1e-3)
    backbone = {id(p) for p in model.backbone.parameters()}
    for group in opt.param_groups:
        inside = {id(p) in backbone for p in group["params"]}
        assert len(inside) == 1  # a group is all backbone or all head
        assert group["lr"] == pytest.approx(1e-4 if inside == {True} else 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# ------------------------------------------------------------------ SMCA's spatially modulated co-attention
def test_spatial_prior_bias_by_hand():
    from vitlab.tasks.detection.detr import spatial_prior_bias

    ref = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])  # one image, one query
    centres = torch.tensor([[0.5, 0.5], [0.7, 0.5], [0.5, 0.9], [0.6, 0.7]])
    bias = spatial_prior_bias(ref, centres, torch.tensor([1.0, 2.0]))
    # (dx / w)^2 + (dy / h)^2 = 0, 1, 1, 0.25 + 0.25; divided by beta = 1 and 2
    expected = -torch.tensor([[0.0, 1.0, 1.0, 0.5], [0.0, 0.5, 0.5, 0.25]])
    torch.testing.assert_close(bias, expected[None, :, None, :])


@pytest.mark.parametrize("remedy", ["dn", "two_stage"])
def test_spatial_prior_modulates_every_cross_attention_around_the_layers_reference(remedy):
    model = tiny(remedy=remedy, spatial_prior=True, num_queries=3, pyramid_scales=(1.0, 0.5)).eval()
    torch.nn.init.normal_(model.box_head[-1].weight, std=0.3)  # the references move from layer to layer
    with torch.no_grad():
        model.spatial_log_beta.normal_()
    seen = []
    for layer in model.decoder:
        layer.cross_attn.register_forward_hook(lambda m, a, kw, out: seen.append(kw["attn_bias"]), with_kwargs=True)
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    centres = torch.tensor([[(i % 4 + 0.5) / 4, (i // 4 + 0.5) / 4] for i in range(16)]
                           + [[(i % 2 + 0.5) / 2, (i // 2 + 0.5) / 2] for i in range(4)])
    first = model.select_anchors(out["enc"]) if remedy == "two_stage" else model.anchors.sigmoid()[None].expand(2, -1, -1)
    refs = [first] + [aux["boxes"] for aux in out["aux"]]  # layer k reads layer k-1's boxes
    from vitlab.tasks.detection.detr import spatial_prior_bias

    assert len(seen) == 3
    for k, bias in enumerate(seen):
        torch.testing.assert_close(bias, spatial_prior_bias(refs[k], centres, model.spatial_log_beta[k].exp()))
    # and it changes what the decoder computes
    plain = tiny(remedy=remedy, spatial_prior=False, num_queries=3, pyramid_scales=(1.0, 0.5)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "spatial_log_beta"})
    assert not torch.allclose(plain(x)["boxes"], out["boxes"], atol=1e-4)


def test_spatial_prior_needs_reference_boxes():
    with pytest.raises(ValueError, match="spatial_prior needs reference boxes"):
        DETRConfig(remedy="none", spatial_prior=True)
