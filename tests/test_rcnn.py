"""Mask R-CNN pieces against torchvision's (golden fixture made by tests/fixtures/make_rcnn_fixtures.py),
and the model end to end: gradients, learning one scene, every backbone kind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from timm_fixtures import FIXTURES
from vitlab.tasks.rcnn.boxes import AnchorGenerator, BoxCoder, match_boxes
from vitlab.tasks.rcnn.model import MaskRCNN, MaskRCNNConfig
from vitlab.tasks.rcnn.roi_heads import RoIHeads
from vitlab.tasks.rcnn.rpn import RegionProposalNetwork, RPNHead

REF = load_file(str(FIXTURES / "torchvision_rcnn.safetensors"))
TINY_VIT = dict(patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, class_token=False, pool="mean")


def tiny_config(**kw) -> MaskRCNNConfig:
    base = dict(backbone="vit_tiny_patch16_224", image_size=64, in_channels=1, num_classes=3,
                backbone_overrides=TINY_VIT, fpn_dim=16, conv_dim=16, fc_dim=32, anchor_scale=4.0,
                canonical_scale=32.0, canonical_level=3, rpn_pre_nms_top_n=(200, 100), rpn_post_nms_top_n=(100, 50),
                roi_batch_size=64)
    return MaskRCNNConfig(**{**base, **kw})


def scene(n: int = 2) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two grey images with one and two bright rectangles (their masks and boxes)."""
    x = torch.zeros(n, 1, 64, 64)
    rects = [[(8, 10, 30, 34, 0)], [(34, 6, 58, 26, 1), (12, 36, 40, 58, 2)]]
    targets = []
    for i in range(n):
        boxes, labels, masks = [], [], []
        for x0, y0, x1, y1, lab in rects[i]:
            m = torch.zeros(64, 64, dtype=torch.bool)
            m[y0:y1, x0:x1] = True
            if lab == 2:  # a triangle, so a mask is not its box
                m &= torch.tril(torch.ones(64, 64, dtype=torch.bool), diagonal=x0 - y0)
            x[i, 0][m] = 0.3 + 0.3 * lab
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            labels.append(lab)
            masks.append(m)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": torch.stack(masks)})
    return (x - 0.5) / 0.5, targets


# ----------------------------------------------------------------- torchvision parity
def test_anchors_match_torchvision():
    gen = AnchorGenerator([(16.0,), (32.0,), (64.0,)], (0.5, 1.0, 2.0))
    anchors = gen([(16, 16), (8, 8), (4, 4)], [4.0, 8.0, 16.0], torch.device("cpu"))
    for lvl, a in enumerate(anchors):
        torch.testing.assert_close(a, REF[f"anchors.{lvl}"], rtol=0, atol=0)


def test_box_coder_matches_torchvision():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.encode(REF["coder.boxes"], REF["coder.ref"]), REF["coder.encoded"])
    decoded = coder.decode(REF["coder.deltas"].view(30, 3, 4), REF["coder.ref"])
    torch.testing.assert_close(decoded, REF["coder.decoded"])  # row 0 hits the log(1000 / 16) clamp


@pytest.mark.parametrize("kind,high,low,low_quality", [("rpn", 0.7, 0.3, True), ("roi", 0.5, 0.5, False)])
def test_matcher_matches_torchvision(kind, high, low, low_quality):
    m = match_boxes(REF["match.gt"], REF["match.candidates"], high, low, low_quality)
    assert torch.equal(m, REF[f"match.{kind}"])


def _rpn() -> RegionProposalNetwork:
    return RegionProposalNetwork(4, [(16.0,), (32.0,), (64.0,)], (0.5, 1.0, 2.0), pre_nms_top_n=(50, 50),
                                 post_nms_top_n=(20, 20), batch_size_per_image=10 ** 6, positive_fraction=0.5)


def _rpn_inputs() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    flat = [RPNHead.flatten(REF[f"rpn.objectness.{lvl}"], REF[f"rpn.deltas.{lvl}"]) for lvl in range(3)]
    anchors = AnchorGenerator([(16.0,), (32.0,), (64.0,)])([(16, 16), (8, 8), (4, 4)], [4.0, 8.0, 16.0],
                                                             torch.device("cpu"))
    return [f[0] for f in flat], [f[1] for f in flat], anchors


def test_rpn_proposals_match_torchvision():
    scores, deltas, anchors = _rpn_inputs()
    proposals = _rpn().train().select(scores, deltas, anchors, (64, 64))
    for i, p in enumerate(proposals):
        torch.testing.assert_close(p, REF[f"rpn.proposals.{i}"])


def test_rpn_loss_matches_torchvision():
    scores, deltas, anchors = _rpn_inputs()
    targets = [{"boxes": REF[f"rpn.gt.{i}"]} for i in range(2)]
    losses = _rpn().loss(torch.cat(scores, 1), torch.cat(deltas, 1), torch.cat(anchors), targets, None)
    torch.testing.assert_close(losses["loss_objectness"], REF["rpn.loss_objectness"][0])
    torch.testing.assert_close(losses["loss_rpn_box"], REF["rpn.loss_box"][0])


def test_detections_match_torchvision_postprocess():
    heads = RoIHeads(4, 3, score_threshold=0.05, nms_threshold=0.5, detections_per_image=10)
    deltas = REF["post.deltas"].view(40, 4, 4)[:, 1:]  # torchvision also regresses the background class
    out = heads.postprocess(REF["post.logits"], deltas, [REF["post.proposals.0"], REF["post.proposals.1"]], (48, 56))
    for i, det in enumerate(out):
        torch.testing.assert_close(det["boxes"], REF[f"post.boxes.{i}"])
        torch.testing.assert_close(det["scores"], REF[f"post.scores.{i}"])
        assert torch.equal(det["labels"] + 1, REF[f"post.labels.{i}"])


def test_rois_are_pooled_on_their_fpn_level_aligned_and_in_order():
    from vitlab.tasks.rcnn.ops import roi_align
    from vitlab.tasks.rcnn.roi_heads import pool_rois

    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)]
    small, large = torch.tensor([[4.0, 4, 20, 20]]), torch.tensor([[2.0, 6, 60, 58]])
    boxes = [torch.cat([large, small]), small + 7]  # image 0: a large then a small box; image 1: a small one
    out = pool_rois(maps, [4.0, 8.0], boxes, 7, canonical_scale=32.0, canonical_level=3)
    def direct(lvl, img, box, stride):
        return roi_align(maps[lvl][img:img + 1], [box], 7, 1.0 / stride, sampling_ratio=0, aligned=True)[0]
    torch.testing.assert_close(out[0], direct(1, 0, large, 8.0))  # sqrt(area) 56 >= 32: stride 8
    torch.testing.assert_close(out[1], direct(0, 0, small, 4.0))  # 16 < 32: stride 4
    torch.testing.assert_close(out[2], direct(0, 1, small + 7, 4.0))


# --------------------------------------------------------------------------- the model
def test_losses_reach_every_part():
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).train()
    x, targets = scene()
    losses = model(x, targets, torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "loss"}
    losses["loss"].backward()
    for name in ("features.backbone.patch_embed.proj.weight", "features.pyramid.stages.0.0.0.weight",
                 "rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight", "roi_heads.box_head.cls_score.weight",
                 "roi_heads.box_head.bbox_pred.weight", "roi_heads.mask_head.predictor.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_sampling_is_drawn_from_the_generator():
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config(rpn_batch_size=16, roi_batch_size=8)).train()
    x, targets = scene()
    a = model(x, targets, torch.Generator().manual_seed(1))["loss"]
    b = model(x, targets, torch.Generator().manual_seed(1))["loss"]
    c = model(x, targets, torch.Generator().manual_seed(2))["loss"]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.slow
def test_learns_one_scene_boxes_and_masks():
    """Fitting two images: every object found (box IoU >= 0.75) with its class and a mask of IoU >= 0.75."""
    from vitlab.tasks.detection.box_ops import box_iou

    torch.manual_seed(0)
    model = MaskRCNN(tiny_config())
    x, targets = scene()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = model.train()(x, targets, gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    dets = model.eval()(x)
    for det, t in zip(dets, targets):
        keep = det["scores"] >= 0.5
        iou = box_iou(t["boxes"], det["boxes"][keep])[0]
        best = iou.max(1)
        assert (best.values >= 0.75).all(), best.values
        assert torch.equal(det["labels"][keep][best.indices], t["labels"])
        masks = det["masks"][keep][best.indices] >= 0.5
        inter = (masks & t["masks"]).flatten(1).sum(1).float()
        union = (masks | t["masks"]).flatten(1).sum(1).float()
        assert (inter / union >= 0.75).all(), inter / union


@pytest.mark.parametrize("backbone,overrides", [
    ("swin_tiny_patch4_window7_224", dict(dim=8, depths=(1, 1, 1, 1), heads=(1, 1, 2, 2), window_size=4)),
    ("pvt_v2_b0", dict(dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), heads=(1, 1, 1, 1))),
])
def test_hierarchical_backbones_get_an_fpn(backbone, overrides):
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config(backbone=backbone, backbone_overrides=overrides))
    assert not model.features.plain and model.features.strides == (4.0, 8.0, 16.0, 32.0, 64.0)
    x, targets = scene()
    model.train()(x, targets)["loss"].backward()
    dets = model.eval()(x)
    assert dets[0]["masks"].shape[-2:] == (64, 64)


def test_simple_pyramid_strides_and_widths():
    model = MaskRCNN(tiny_config())
    assert model.features.plain and model.features.strides == (2.0, 4.0, 8.0, 16.0, 32.0)
    maps = model.features(torch.zeros(1, 1, 64, 64))
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    # ViTDet: the x4 branch halves the width twice, the x2 branch once, before the 1x1 conv
    convs = [stage[1][0] for stage in model.features.pyramid.stages]
    assert [c.in_channels for c in convs] == [8, 16, 32, 32]


def test_bad_targets_are_one_clear_error():
    model = MaskRCNN(tiny_config()).train()
    x, targets = scene()
    targets[0]["masks"] = targets[0]["masks"][:, :32]
    with pytest.raises(ValueError, match=r"target 0: expected masks \(n, H, W\) = \(1, 64, 64\)"):
        model(x, targets)
    x, targets = scene()
    targets[1]["labels"] = torch.tensor([1, 7])
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):
        model(x, targets)
