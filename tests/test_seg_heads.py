"""Segmentation heads (SETR naive/PUP/MLA, all-MLP, semantic FPN, attention upsampling) and Segmenter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from vitlab.components import capture_attention
from vitlab.tasks.segmentation import (
    AllMlpHead,
    AttentionUpsample,
    FpnHead,
    Segmenter,
    SegmentationLoss,
    SetrMlaHead,
    SetrUpHead,
    backbone_intermediates,
    feature_channels_strides,
)

K = 5
ODD = (45, 67)  # (H, W), neither a multiple of any stride

PLAIN = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "cait_xxs24_224"]
PYRAMID = ["swin_tiny_patch4_window7_224", "pvt_v2_b0", "pvt_tiny"]


def _plain_head(kind: str, backbone, upsample: str = "bilinear"):
    """(head, indices) for a plain backbone; the expected up factor of the head."""
    if kind == "mla":
        idx = [0, 1, -1]
        ch, st = feature_channels_strides(backbone, idx)
        return SetrMlaHead(ch, st[0], K, mla_channels=8, channels=8), idx, 4
    ch, st = feature_channels_strides(backbone, [-1])
    make = SetrUpHead.naive if kind == "naive" else SetrUpHead.pup
    head = make(ch[0], st[0], K, channels=8, upsample=upsample, attn_heads=2)
    return head, [-1], (4 if kind == "naive" else 16)


def _pyramid_head(kind: str, backbone):
    idx = [0, 1, 2, 3]
    ch, st = feature_channels_strides(backbone, idx)
    if kind == "mlp":
        return AllMlpHead(ch, st, K, decoder_dim=8), idx
    return FpnHead(ch, st, K, fpn_dim=8, channels=8, groups=4), idx


def _off_path(backbone: torch.nn.Module, x: torch.Tensor) -> set[str]:
    """Backbone parameters that none of its returnable maps depends on (a final norm or CaiT's
    class-attention blocks, which a segmenter does not use)."""
    n = len(backbone.feature_info)
    sum(f.sum() for f in backbone_intermediates(backbone, x, list(range(n)))).backward()
    off = {f"backbone.{k}" for k, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    backbone.zero_grad(set_to_none=True)
    return off


def _grads_reach_everything(model: torch.nn.Module, loss: torch.Tensor, off_path: set[str] = frozenset()) -> None:
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if n not in off_path and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing[:5]}"


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("kind", ["naive", "pup", "mla"])
def test_setr_heads_shape_stride_and_gradients(name: str, kind: str) -> None:
    backbone = tiny_model(name, num_classes=0)
    head, idx, up = _plain_head(kind, backbone)
    model = Segmenter(backbone, head, idx).train()
    x = torch.randn(2, 3, *ODD)
    off = _off_path(backbone, x)
    assert not any(k.startswith("backbone.blocks.0.") for k in off)
    stride = backbone.feature_info[-1]["reduction"]
    grid = (math.ceil(ODD[0] / stride), math.ceil(ODD[1] / stride))
    feats = [f for f in model._features(x, with_aux=False)[0]]
    raw = head(feats)
    assert raw.shape == (2, K, grid[0] * up, grid[1] * up)
    assert head.output_stride == stride / up
    out = model(x)
    assert out.shape == (2, K, *ODD)
    _grads_reach_everything(model, out.square().mean(), off)


@pytest.mark.parametrize("name", PYRAMID)
@pytest.mark.parametrize("kind", ["mlp", "fpn"])
def test_pyramid_heads_shape_stride_and_gradients(name: str, kind: str) -> None:
    backbone = tiny_model(name, num_classes=0)
    head, idx = _pyramid_head(kind, backbone)
    model = Segmenter(backbone, head, idx).train()
    x = torch.randn(2, 3, *ODD)
    off = _off_path(backbone, x)
    feats = model._features(x, with_aux=False)[0]
    s0 = backbone.feature_info[0]["reduction"]
    raw = head(feats)
    assert raw.shape == (2, K, *feats[0].shape[-2:])
    assert feats[0].shape[-2:] == (math.ceil(ODD[0] / s0), math.ceil(ODD[1] / s0))
    assert head.output_stride == s0
    out = model(x)
    assert out.shape == (2, K, *ODD)
    _grads_reach_everything(model, out.square().mean(), off)


def test_mla_aggregates_top_down() -> None:
    """Level i's smoothing conv sees the sum of the lateral outputs of levels i..L-1."""
    torch.manual_seed(0)
    head = SetrMlaHead([8, 8, 8], 16, K, mla_channels=8, channels=8).eval()
    lat, smooth_in = [], []
    for m in head.lateral:
        m.register_forward_hook(lambda mod, i, o: lat.append(o))
    for m in head.smooth:
        m.register_forward_hook(lambda mod, i, o: smooth_in.append(i[0]))
    head([torch.randn(1, 8, 3, 5) for _ in range(3)])
    for i in range(3):
        torch.testing.assert_close(smooth_in[i], sum(lat[i:]))


def test_all_mlp_head_matches_explicit_formula() -> None:
    """SegFormer's decoder by hand: per-stage linear, bilinear to stage 0, concat deepest first, fuse."""
    torch.manual_seed(0)
    ch, st = [4, 6, 8], [4, 8, 16]
    head = AllMlpHead(ch, st, K, decoder_dim=5).eval()
    with torch.no_grad():
        head.batch_norm.running_mean.uniform_(-1, 1)
        head.batch_norm.running_var.uniform_(0.5, 2)
    feats = [torch.randn(2, c, 9 // 2**i + 1, 7 // 2**i + 1) for i, c in enumerate(ch)]
    ups = []
    for f, lin in zip(feats, head.linear_c):
        y = torch.einsum("bchw,dc->bdhw", f, lin.proj.weight) + lin.proj.bias[None, :, None, None]
        ups.append(F.interpolate(y, size=feats[0].shape[-2:], mode="bilinear", align_corners=False))
    fused = F.conv2d(torch.cat(ups[::-1], 1), head.linear_fuse.weight)
    bn = head.batch_norm
    fused = (fused - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    fused = fused * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    ref = F.conv2d(fused.relu(), head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(head(feats), ref)


def test_aux_heads_run_in_training_only_and_are_weighted() -> None:
    backbone = tiny_model("vit_tiny_patch16_224", num_classes=0)
    ch, st = feature_channels_strides(backbone, [-1])
    main = SetrUpHead.naive(ch[0], st[0], K, channels=8)
    aux = [SetrUpHead.naive(ch[0], st[0], K, channels=8) for _ in range(2)]
    model = Segmenter(backbone, main, [-1], aux_heads=aux, aux_indices=[[0], [1]], aux_weights=[0.4, 0.2])
    calls = []
    for i, a in enumerate(aux):
        a.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0][0])))
    x = torch.randn(2, 3, 40, 36)
    target = torch.randint(0, K, (2, 40, 36))
    target[:, :5] = 255

    model.train()
    logits, aux_logits = model.forward_with_aux(x)
    assert [c[0] for c in calls] == [0, 1] and len(aux_logits) == 2
    # each aux head read its own block's map
    maps = backbone_intermediates(backbone, x, [0, 1])
    torch.testing.assert_close(calls[0][1], maps[0])
    torch.testing.assert_close(calls[1][1], maps[1])
    assert all(a.shape == (2, K, 40, 36) for a in aux_logits)
    loss = SegmentationLoss(aux_weights=[0.4, 0.2])(logits, target, aux_logits)
    ce = lambda z: F.cross_entropy(z, target, ignore_index=255)  # noqa: E731
    torch.testing.assert_close(loss, ce(logits) + 0.4 * ce(aux_logits[0]) + 0.2 * ce(aux_logits[1]))

    calls.clear()
    model.eval()
    with torch.no_grad():
        logits_eval, aux_eval = model.forward_with_aux(x)
        plain = model(x)
    assert calls == [] and aux_eval == []
    torch.testing.assert_close(logits_eval, plain)
    # eval output does not depend on the aux heads at all
    with torch.no_grad():
        for a in aux:
            for p in a.parameters():
                p.add_(1.0)
        torch.testing.assert_close(model(x), plain)


def test_attention_upsampling_is_learned_cross_attention() -> None:
    """Each output pixel's query attends to its parent's 3x3 token neighbourhood through vitlab's attention."""
    torch.manual_seed(0)
    up = AttentionUpsample(8, scale=2, heads=2, window=3).eval()
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    with capture_attention(up) as cap:
        y = up(x)
    assert y.shape == (2, 8, 10, 12)
    # one query per child (2x2) of each of the 2*5*6 input pixels, 9 keys each
    assert len(cap.records) == 1 and cap.records[0].probs.shape == (2 * 5 * 6, 2, 4, 9)
    probs = cap.records[0].probs.view(2, 5, 6, 2, 4, 3, 3)  # (B*h*w, heads, s*s, 9) -> per pixel, 3x3 keys
    assert torch.all(probs[:, 0, :, :, :, 0, :] == 0) and torch.all(probs[:, :, 0, :, :, :, 0] == 0)  # outside masked
    assert torch.all(probs[:, 1:4, 1:5, :, :] > 0)
    # output (7, 7) is a child of input (3, 3): it sees inputs 2..4 x 2..4 (bilinear x2 sees only
    # 3..4 x 3..4) and nothing further away
    y[0, :, 7, 7].sum().backward()
    g = x.grad[0].abs().sum(0)
    assert torch.all(g[2:5, 2:5] > 0)
    g[2:5, 2:5] = 0
    assert torch.all(g == 0)
    # the children of one input pixel get different values (learned sub-pixel queries)
    assert not torch.allclose(y[0, :, 6, 6], y[0, :, 7, 7])


@pytest.mark.parametrize("kind", ["naive", "pup"])
def test_setr_head_attention_upsample_option(kind: str) -> None:
    backbone = tiny_model("vit_tiny_patch16_224", num_classes=0)
    head, idx, up = _plain_head(kind, backbone, upsample="attention")
    assert sum(isinstance(m, AttentionUpsample) for m in head.modules()) == (1 if kind == "naive" else 4)
    assert not any(isinstance(m, torch.nn.Upsample) for m in head.modules())
    model = Segmenter(backbone, head, idx).train()
    x = torch.randn(1, 3, 21, 35)
    off = _off_path(backbone, x)
    out = model(x)
    assert out.shape == (1, K, 21, 35)
    _grads_reach_everything(model, out.square().mean(), off)
    with pytest.raises(ValueError, match="upsample must be"):
        SetrUpHead.naive(8, 16, K, upsample="bicubic")


def test_head_rejects_wrong_feature_maps() -> None:
    head = AllMlpHead([4, 8], [4, 8], K, decoder_dim=8)
    with pytest.raises(ValueError, match=r"feature map 1 should be \(B, 8, H, W\)"):
        head([torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)])
    with pytest.raises(ValueError, match="built for 2 feature map"):
        head([torch.randn(1, 4, 8, 8)])


def test_fpn_top_down_pathway() -> None:
    """Level i's 3x3 output conv sees its lateral plus the nearest-upsampled sum from above."""
    torch.manual_seed(0)
    head = FpnHead([4, 6, 8], [4, 8, 16], K, fpn_dim=8, channels=8, groups=4).eval()
    lat, out_in = [], []
    for m in head.lateral:
        m.register_forward_hook(lambda mod, i, o: lat.append(o))
    for m in head.output:
        m.register_forward_hook(lambda mod, i, o: out_in.append(i[0]))
    head([torch.randn(1, 4, 11, 9), torch.randn(1, 6, 6, 5), torch.randn(1, 8, 3, 3)])
    top = lat[2]
    mid = lat[1] + F.interpolate(top, size=(6, 5), mode="nearest")
    low = lat[0] + F.interpolate(mid, size=(11, 9), mode="nearest")
    for got, ref in zip(out_in, [low, mid, top]):
        torch.testing.assert_close(got, ref)


class _TimmStyleBackbone(torch.nn.Module):
    """The coming contract: forward_intermediates(x, indices, norm, output_fmt, intermediates_only)
    returns (final, maps) unless intermediates_only."""

    feature_info = [dict(num_chs=3, reduction=1), dict(num_chs=3, reduction=1)]

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def forward_intermediates(self, x, indices=None, norm=False, output_fmt="NHWC", intermediates_only=False):
        self.calls.append(dict(indices=indices, output_fmt=output_fmt, intermediates_only=intermediates_only))
        maps = [x * self.scale * (i + 1) for i in indices]
        if output_fmt == "NHWC":
            maps = [m.permute(0, 2, 3, 1) for m in maps]
        return maps if intermediates_only else (x, maps)


def test_segmenter_asks_for_nchw_intermediates_only() -> None:
    backbone = _TimmStyleBackbone()
    model = Segmenter(backbone, AllMlpHead([3, 3], [1, 1], K, decoder_dim=4), [0, -1]).eval()
    x = torch.randn(1, 3, 5, 6)
    assert model(x).shape == (1, K, 5, 6)
    assert backbone.calls == [dict(indices=[0, 1], output_fmt="NCHW", intermediates_only=True)]
    maps = backbone_intermediates(backbone, x, [1])
    torch.testing.assert_close(maps[0], 2 * x)
