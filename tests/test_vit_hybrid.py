"""Hybrid ViTs (ResNet v2 stem + ViT): timm parity, timm's parameter counts, the token stride,
and the tasks on top (detection, segmentation, explainability; MAE refuses them).

The golden files ``timm_vit_hybrid*.safetensors`` come from ``tests/fixtures/make_timm_fixtures.py``
(a timm ``VisionTransformer`` with ``embed_layer=partial(HybridEmbed, backbone=ResNetV2(...))``).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.components import interpolate_pos_embed
from vitlab.models import build_model, get_entry, list_models
from vitlab.models.resnetv2 import make_divisible, pad_same
from vitlab.models.vit_hybrid import ViTHybrid, ViTHybridConfig

from conftest import tiny_model
from timm_fixtures import timm_fixture

# timm 1.0.31: sum(p.numel()) of timm.create_model(name, num_classes=1000) on the meta device.
TIMM_COUNTS = {
    "vit_tiny_r_s16_p8_224": 6_337_704,
    "vit_tiny_r_s16_p8_384": 6_355_944,
    "vit_small_r26_s32_224": 36_431_912,
    "vit_small_r26_s32_384": 36_468_392,
    "vit_base_r26_s32_224": 101_383_976,
    "vit_base_r50_s16_224": 98_659_112,  # timm's default (in21k weights, num_classes=0): 97_890_112
    "vit_base_r50_s16_384": 98_950_952,
    "vit_large_r50_s32_224": 328_994_856,
    "vit_large_r50_s32_384": 329_092_136,
}
#: input pixels per token: the CNN's stride (4 for the stem, x2 per stage after the first) x patch size
STRIDES = {
    "vit_tiny_r_s16_p8_224": 32, "vit_tiny_r_s16_p8_384": 32, "vit_small_r26_s32_224": 32,
    "vit_small_r26_s32_384": 32, "vit_base_r26_s32_224": 32, "vit_base_r50_s16_224": 16,
    "vit_base_r50_s16_384": 16, "vit_large_r50_s32_224": 32, "vit_large_r50_s32_384": 32,
}
HYBRIDS = sorted(TIMM_COUNTS)
CASES = ["vit_hybrid", "vit_hybrid_stem"]


def test_every_hybrid_is_registered():
    # "vit_*_r*" also matches the register models (vit_*_reg4_*): keep the hybrid family's names
    assert {n for n in list_models("vit_*_r*") if get_entry(n).family == "vit_hybrid"} == set(HYBRIDS)


@pytest.mark.parametrize("name", HYBRIDS)
def test_parameter_count_is_timms(name):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == TIMM_COUNTS[name]
    assert isinstance(model, ViTHybrid)


def test_parameter_count_without_head_is_timms_default():
    with torch.device("meta"):
        model = build_model("vit_base_r50_s16_224", num_classes=0)
    assert model.num_params() == 97_890_112


@pytest.mark.parametrize("name", HYBRIDS)
def test_token_stride_in_feature_info_and_layout(name):
    """feature_info and token_layout report the CNN stride x patch size, at the variant's size
    and shrunk; the position embedding is laid out on that grid."""
    with torch.device("meta"):
        full = build_model(name)
    s = STRIDES[name]
    h, w = full.config.image_size
    assert full.config.stride == s and all(i["reduction"] == s for i in full.feature_info)
    assert full.grid_size == (h // s, w // s)
    assert full.pos_embed.weight.shape == (1, 1 + (h // s) * (w // s), full.config.dim)
    model = tiny_model(name).eval()
    assert model.feature_info[0]["reduction"] == s
    layout = model.token_layout((2 * s + 5, s + 1))
    for f in layout.features:
        assert f.grid.shape == (3, 2) and f.grid.cell == (float(s), float(s))
    assert layout.attention[0].queries[1].grid.shape == (3, 2)


# ------------------------------------------------------------------------------ timm parity
def _config(kw: dict) -> ViTHybridConfig:
    """The vitlab config of a fixture's timm kwargs."""
    bb = kw["backbone"]
    return ViTHybridConfig(
        image_size=tuple(kw["img_size"]) if isinstance(kw["img_size"], list) else kw["img_size"],
        patch_size=kw["patch_size"], in_channels=kw["in_chans"], num_classes=kw["num_classes"],
        dim=kw["embed_dim"], depth=kw["depth"], heads=kw["num_heads"], mlp_dim=int(kw["embed_dim"] * kw["mlp_ratio"]),
        qkv_bias=kw["qkv_bias"], backbone_layers=tuple(bb["layers"]), backbone_widths=tuple(bb.get("channels", (256,))),
        stem_width=bb["stem_chs"], norm_groups=bb["num_groups"],
    )


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_timm_golden_fixture_parity(case):
    """timm's state dict loads strictly, unconverted; logits and features match timm's, at the
    fixture's size and at an odd size (SAME padding, position embedding resampled, map padded)."""
    kw, sd, t, _ = timm_fixture(case)
    model = ViTHybrid(_config(kw)).eval()
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)
    for suffix in ("", "_odd"):
        x = t[f"input{suffix}"]
        torch.testing.assert_close(model(x), t[f"output{suffix}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(x), t[f"features{suffix}"], atol=1e-5, rtol=0)
    odd = t["input_odd"].shape[-2:]
    assert t["features_odd"].shape[1] == 1 + math.prod(model.patch_embed.grid_size(tuple(odd)))


def test_timm_file_loads_through_create_model(tmp_path):
    """A timm-layout safetensors file loads into a registered hybrid by name (sizes overridden)."""
    kw, sd, t, _ = timm_fixture("vit_hybrid")
    path = tmp_path / "timm_hybrid.safetensors"
    save_file(sd, str(path))
    cfg = _config(kw)
    overrides = dict(image_size=32, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim,
                     backbone_layers=cfg.backbone_layers, backbone_widths=cfg.backbone_widths,
                     stem_width=cfg.stem_width, norm_groups=cfg.norm_groups)
    model = vitlab.create_model("vit_base_r50_s16_384", pretrained=path, num_classes=10, **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(t["input"]), t["output"], atol=1e-5, rtol=0)
    # another image size: the 4x4 position embedding is resampled (bicubic) to 6x6 on load
    bigger = vitlab.create_model("vit_base_r50_s16_384", pretrained=path, num_classes=10,
                                 **{**overrides, "image_size": 48})
    expected = interpolate_pos_embed(sd["pos_embed"], (6, 6), 1)
    torch.testing.assert_close(bigger.pos_embed.weight.detach(), expected, atol=1e-6, rtol=0)
    assert torch.equal(bigger.patch_embed.backbone.stem.conv.weight, sd["patch_embed.backbone.stem.conv.weight"])


def test_same_padding_and_make_divisible_by_hand():
    x = torch.arange(5.0).reshape(1, 1, 1, 5)
    # kernel 3, stride 2 on 5: ceil(5/2) = 3 outputs need 7 inputs -> one pixel each side
    assert pad_same(x, (1, 3), (1, 2)).tolist() == [[[[0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0]]]]
    # on 4: 2 outputs need 5 inputs -> the extra pixel goes after (TensorFlow's rule)
    assert pad_same(x[..., :4], (1, 3), (1, 2)).tolist() == [[[[0.0, 1.0, 2.0, 3.0, 0.0]]]]
    assert [make_divisible(v) for v in (16, 64, 128, 256, 512)] == [16, 64, 128, 256, 512]
    assert make_divisible(64 * 0.25) == 16 and make_divisible(3) == 8


# ------------------------------------------------------------------------------ behaviour
def test_gradient_reaches_the_stem():
    model = tiny_model("vit_base_r50_s16_224", num_classes=3).train()
    x = torch.randn(2, 3, *model.config.image_size)
    model(x).logsumexp(-1).mean().backward()
    stem = model.patch_embed.backbone.stem.conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert model.patch_embed.backbone.stages[0].blocks[0].downsample.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224"])
@torch.no_grad()
def test_token_grid_lands_on_the_image(name):
    """A bump at a token cell's centre moves that token's embedding most (the layout's
    index_at). For the stem-only CNN (receptive field < a 32-pixel cell) the others move only
    through GroupNorm's image-wide statistics: at least 5x less."""
    model = tiny_model(name).eval()
    size = tuple(model.config.image_size)
    grid = model.token_layout(size).features[0].grid
    x = torch.randn(1, 3, *size)
    base, _ = model.patch_embed(x)
    for i, j in [(0, 0), (1, 2), (3, 1)]:
        cy, cx = int((i + 0.5) * grid.cell[0]), int((j + 0.5) * grid.cell[1])
        y = x.clone()
        y[..., cy - 1 : cy + 1, cx - 1 : cx + 1] += 10.0
        moved = (model.patch_embed(y)[0] - base).abs().sum(-1)[0]  # (N,)
        k = grid.index_at(cy, cx)
        assert k == i * grid.shape[1] + j and int(moved.argmax()) == k
        if name.startswith("vit_tiny_r"):
            assert moved[k] > 5 * torch.cat([moved[:k], moved[k + 1 :]]).max()


def test_pad_input_and_odd_sizes():
    model = tiny_model("vit_tiny_r_s16_p8_224", num_classes=2).eval()
    out = model(torch.randn(1, 3, 77, 50))  # map 20x13 padded to 24x16: 3x2 tokens
    assert out.shape == (1, 2)
    strict = tiny_model("vit_tiny_r_s16_p8_224", num_classes=2, pad_input=False).eval()
    with pytest.raises(ValueError, match=r"not a multiple of the hybrid's token stride 32x32; resize to e.g. 96x64"):
        strict(torch.randn(1, 3, 77, 50))
    with pytest.raises(ValueError, match="expected 3 input channel"):
        model(torch.randn(1, 1, 64, 64))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"must be divisible by norm_groups \(32\)"):
        ViTHybridConfig(backbone_widths=(48, 512, 1024))
    with pytest.raises(ValueError, match="needs a width for each of the 3 stages"):
        ViTHybridConfig(backbone_widths=(256, 512))
    with pytest.raises(ValueError, match="patch_embed must be 'conv'"):
        ViTHybridConfig(patch_embed="linear")
    with pytest.raises(ValueError, match="unknown|backbone_layer"):
        vitlab.create_model("vit_small_r26_s32_224", backbone_layer=(1,))


def test_mae_refuses_a_hybrid_with_one_clear_error():
    from vitlab.tasks.mae import MAE

    model = tiny_model("vit_small_r26_s32_224", num_classes=0)
    with pytest.raises(ValueError, match=r"^MAE cannot pre-train ViTHybrid: its tokens cover 32x32 pixels, not 1x1 "
                                         r"image patches, because a CNN stem .*cannot be dropped before it"):
        MAE(model)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"cannot be pre-trained by masked image modelling: MAE needs a plain ViT "
                                         r"family \((?!.*vit_hybrid).*\).*CNN that sees the whole image"):
        model.forward_features(torch.randn(1, 3, *model.config.image_size), mask=mask)
    # a plain ViT still builds
    MAE(tiny_model("vit_tiny_patch16_224", num_classes=0))


def test_detr_on_a_hybrid_backbone_trains_the_stem():
    from vitlab.tasks.detection import DETRLoss
    from vitlab.tasks.detection.detr import DETR, DETRConfig

    tiny = ViTHybrid.tiny_overrides(ViTHybridConfig(backbone_layers=(3, 4, 9)))
    tiny.pop("image_size")
    torch.manual_seed(0)
    model = DETR(DETRConfig(backbone="vit_base_r50_s16_224", backbone_overrides=tiny, image_size=64, in_channels=3,
                            num_classes=3, dim=32, heads=2, mlp_dim=64, num_queries=5, enc_layers=1, dec_layers=2))
    assert model.plain  # one stride: the simple feature pyramid on the stride-16 map
    x = torch.rand(2, 3, 64, 64)
    maps = model.feature_levels(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4), (2, 2)]  # stride 16: 4x4, x2, /2
    out = model.train()(x)
    assert out["logits"].shape == (2, 5, 4) and out["boxes"].shape == (2, 5, 4)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]])}]
    layers = [*out["aux"], {"logits": out["logits"], "boxes": out["boxes"]}]
    DETRLoss(3)(layers, targets)["loss"].backward()
    assert model.backbone.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_segmenter_on_a_hybrid_backbone():
    from vitlab.tasks.segmentation import Segmenter, SetrUpHead, feature_channels_strides

    backbone = tiny_model("vit_small_r26_s32_224", num_classes=0)
    ch, st = feature_channels_strides(backbone, [-1])
    assert st == [32]
    model = Segmenter(backbone, SetrUpHead.naive(ch[0], st[0], 4, channels=8), [-1]).train()
    x = torch.randn(2, 3, 45, 67)
    out = model(x)
    assert out.shape == (2, 4, 45, 67)
    out.square().mean().backward()
    assert backbone.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_explainability_maps_cover_the_image():
    from vitlab.evaluation import AttentionVisualizer, grad_cam

    model = tiny_model("vit_tiny_r_s16_p8_224").eval()
    x = torch.randn(1, 3, 133, 101)  # grid 5x4 (stride 32), the last row and column partly padding
    maps = AttentionVisualizer(model).generate_attention_maps(x)
    assert maps and all(m.map.shape == (1, 133, 101) and m.token_map.shape[-2:] == (5, 4) for m in maps)
    cam = grad_cam(model, x)
    assert cam.maps.shape == (1, 133, 101) and torch.isfinite(cam.maps).all()
    assert [tuple(m.shape[-2:]) for m in cam.token_maps.values()] == [(5, 4)]
