"""PVT v1 / v2: timm and Hugging Face parity, spatial-reduction attention, checkpoints, counts.

The timm fixtures (tests/fixtures/timm_pvt_v2{,_li}.safetensors, see make_timm_fixtures.py) are
tiny timm ``PyramidVisionTransformerV2`` models (dims 4/8/16/32, one block per stage, 64x64
input; ``_li``: ``linear=True``) with every parameter re-randomised. The Hugging Face models are
built here from tiny configs and re-randomised the same way, so every weight moves the logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vitlab
import vitlab.models.base as checkpoint_home  # where the blocks are checkpointed
from vitlab.models import (
    PvtConfig,
    PvtV2Config,
    PyramidVisionTransformer,
    PyramidVisionTransformerV2,
    SpatialReductionAttention,
    build_model,
)
from vitlab.pretrained import convert_state_dict, create_model, detect_layout, load_state_dict_checked

from test_registry_models import OTHER_PARAM_COUNTS
from timm_fixtures import resample_reference
from timm_fixtures import timm_fixture as read_timm_fixture


# ---------------------------------------------------------------------------------- helpers
def timm_fixture(case: str) -> tuple[dict, dict, dict]:
    """(timm state dict, other tensors, constructor kwargs) of ``timm_<case>.safetensors``."""
    kwargs, sd, rest, _ = read_timm_fixture(case)
    return sd, rest, kwargs


def v2_config_from_timm(kw: dict) -> PvtV2Config:
    """The vitlab config of timm ``PyramidVisionTransformerV2`` constructor kwargs."""
    return PvtV2Config(
        image_size=64, in_channels=kw["in_chans"], num_classes=kw["num_classes"], dims=tuple(kw["embed_dims"]),
        depths=tuple(kw["depths"]), heads=tuple(kw["num_heads"]), mlp_ratios=tuple(kw["mlp_ratios"]),
        sr_ratios=tuple(kw["sr_ratios"]), linear=kw.get("linear", False),
    )


@torch.no_grad()
def rerandomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every parameter (as make_timm_fixtures.py does for timm)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name == "weight" else 0.0))
            elif p.ndim >= 2 and "position" not in name and "token" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:  # biases, position embeddings, class token
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def hf_v2(linear: bool = False, classifier: bool = True):
    """A tiny re-randomised HF PvtV2 (dims 4/8/20/32, two blocks in stage 0)."""
    transformers = pytest.importorskip("transformers")  # skips only the tests that build HF models
    cfg = transformers.PvtV2Config(
        hidden_sizes=[4, 8, 20, 32], depths=[2, 1, 1, 1], num_attention_heads=[1, 2, 5, 8],
        sr_ratios=[8, 4, 2, 1], mlp_ratios=[8, 8, 4, 4], num_labels=10, linear_attention=linear,
    )
    cls = transformers.PvtV2ForImageClassification if classifier else transformers.PvtV2Model
    model = cls(cfg).eval()
    rerandomise(model, seed=1 + linear)
    return model


def vitlab_v2_for(hf_cfg, **extra) -> dict:
    """vitlab overrides reproducing an HF PvtV2 config (HF uses one LayerNorm eps everywhere)."""
    return dict(
        dims=tuple(hf_cfg.hidden_sizes), depths=tuple(hf_cfg.depths), heads=tuple(hf_cfg.num_attention_heads),
        sr_ratios=tuple(hf_cfg.sr_ratios), mlp_ratios=tuple(hf_cfg.mlp_ratios), linear=hf_cfg.linear_attention,
        norm_eps=hf_cfg.layer_norm_eps, local_norm_eps=hf_cfg.layer_norm_eps, image_size=64, **extra,
    )


def hf_v1(classifier: bool = True):
    """A tiny re-randomised HF Pvt (v1; dims 4/8/20/32, two blocks in stage 0, 64x64)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.PvtConfig(
        image_size=64, hidden_sizes=[4, 8, 20, 32], depths=[2, 1, 1, 1], num_attention_heads=[1, 2, 5, 8],
        sequence_reduction_ratios=[8, 4, 2, 1], mlp_ratios=[8, 8, 4, 4], patch_sizes=[4, 2, 2, 2],
        strides=[4, 2, 2, 2], num_labels=10,
    )
    cls = transformers.PvtForImageClassification if classifier else transformers.PvtModel
    model = cls(cfg).eval()
    rerandomise(model, seed=3)
    return model


def vitlab_v1_for(hf_cfg) -> dict:
    return dict(
        dims=tuple(hf_cfg.hidden_sizes), depths=tuple(hf_cfg.depths), heads=tuple(hf_cfg.num_attention_heads),
        sr_ratios=tuple(hf_cfg.sequence_reduction_ratios), mlp_ratios=tuple(hf_cfg.mlp_ratios),
        patch_size=hf_cfg.patch_sizes[0], image_size=hf_cfg.image_size, norm_eps=hf_cfg.layer_norm_eps,
        local_norm_eps=hf_cfg.layer_norm_eps,
    )


def assert_close_and_nontrivial(ours: torch.Tensor, ref: torch.Tensor, atol: float) -> float:
    """Numerical parity, on outputs that actually vary (a constant output proves nothing)."""
    assert ref.std() > 0.1, "reference output is near-constant: the parity check would be vacuous"
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"
    return diff


# ---------------------------------------------------------------------------------- timm parity
@pytest.mark.parametrize("case", ["pvt_v2", "pvt_v2_li"])
def test_timm_parity(case):
    sd, rest, kw = timm_fixture(case)
    model = PyramidVisionTransformerV2(v2_config_from_timm(kw)).eval()
    vsd, layout = convert_state_dict(sd, model)
    assert layout == "timm"
    assert load_state_dict_checked(model, vsd) == []
    x = rest["input"]
    with torch.no_grad():
        assert_close_and_nontrivial(model(x), rest["output"], atol=1e-5)
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, rest["features"], atol=1e-5, rtol=0)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(4, 16, 16), (8, 8, 8), (16, 4, 4), (32, 2, 2)]
    torch.testing.assert_close(maps[-1], feats)


def test_timm_keys_are_vitlab_keys_but_the_depthwise_conv():
    sd, _, kw = timm_fixture("pvt_v2")
    own = set(PyramidVisionTransformerV2(v2_config_from_timm(kw)).state_dict())
    renamed = {k.replace(".mlp.dwconv.", ".mlp.mid.dwconv.") for k in sd}
    assert renamed == own
    assert {k for k in sd if k not in own} == {k for k in sd if ".mlp.dwconv." in k}


def test_official_v2_layout_converts():
    """whai362/PVT pvt_v2.py keys (patch_embedN, blockN.M, normN, mlp.dwconv.dwconv) load too."""
    sd, rest, kw = timm_fixture("pvt_v2")

    def official(k: str) -> str:  # timm -> official, the inverse of timm's checkpoint_filter_fn
        parts = k.split(".")
        if parts[0] == "patch_embed":
            return "patch_embed1." + ".".join(parts[1:])
        if parts[0] == "stages":
            s, rest_ = int(parts[1]), parts[2:]
            if rest_[0] == "downsample":
                return f"patch_embed{s + 1}." + ".".join(rest_[1:])
            if rest_[0] == "norm":
                return f"norm{s + 1}." + ".".join(rest_[1:])
            return f"block{s + 1}." + ".".join(rest_[1:]).replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        return k

    off = {official(k): v for k, v in sd.items()}
    model = PyramidVisionTransformerV2(v2_config_from_timm(kw)).eval()
    vsd, layout = convert_state_dict(off, model)
    assert layout == "official"
    load_state_dict_checked(model, vsd)
    with torch.no_grad():
        assert_close_and_nontrivial(model(rest["input"]), rest["output"], atol=1e-5)


# ---------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("linear", [False, True], ids=["sra", "linear_sra"])
def test_hf_pvt_v2_parity(linear):
    hf = hf_v2(linear)
    model = build_model("pvt_v2_b0", **vitlab_v2_for(hf.config, num_classes=10)).eval()
    vsd, layout = convert_state_dict(hf.state_dict(), model)
    assert layout == "hf"
    assert load_state_dict_checked(model, vsd) == []
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        assert_close_and_nontrivial(model(x), ref.logits, atol=1e-4)
        maps = model.forward_intermediates(x, intermediates_only=True)
    for ours, theirs in zip(maps, ref.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_hf_pvt_v2_model_without_head():
    """``PvtV2Model`` (no ``pvt_v2.`` prefix, no classifier) loads into a headless model."""
    hf = hf_v2(classifier=False)
    model = build_model("pvt_v2_b0", **vitlab_v2_for(hf.config, num_classes=0)).eval()
    vsd, layout = convert_state_dict(hf.state_dict(), model)
    assert layout == "hf"
    load_state_dict_checked(model, vsd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close_and_nontrivial(model.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-4)


def test_hf_pvt_v1_parity():
    hf = hf_v1()
    model = build_model("pvt_tiny", **vitlab_v1_for(hf.config), num_classes=10).eval()
    vsd, layout = convert_state_dict(hf.state_dict(), model)
    assert layout == "hf"
    assert load_state_dict_checked(model, vsd) == []
    x = torch.randn(2, 3, 64, 64)  # HF Pvt resamples position embeddings wrongly for non-square input
    with torch.no_grad():
        assert_close_and_nontrivial(model(x), hf(pixel_values=x).logits, atol=1e-4)
        torch.testing.assert_close(model.forward_features(x), hf.pvt(pixel_values=x).last_hidden_state,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_create_model_from_saved_hf_folder(version, tmp_path):
    """create_model(name, pretrained=<folder of an HF save_pretrained>) end to end, tiny config."""
    if version == "v2":
        hf, name = hf_v2(), "pvt_v2_b0"
        overrides = vitlab_v2_for(hf.config)
    else:
        hf, name = hf_v1(), "pvt_tiny"
        overrides = vitlab_v1_for(hf.config)
    hf.save_pretrained(tmp_path)
    model = create_model(name, pretrained=tmp_path, num_classes=10, **overrides).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close_and_nontrivial(model(x), hf(pixel_values=x).logits, atol=1e-4)


def test_detectors_do_not_misfire():
    """Our layouts are not claimed by other families' checkpoints, nor v1 by v2 and back."""
    v2_timm, _, _ = timm_fixture("pvt_v2")
    for case in ("vit", "swin", "cait", "deit_distilled"):
        sd, _, _ = timm_fixture(case)
        assert detect_layout(sd, "pvt_v2") == "vitlab", case
        assert detect_layout(sd, "pvt") == "vitlab", case
    assert detect_layout(v2_timm, "pvt") == "vitlab"
    tiny_v1 = PyramidVisionTransformer(PvtConfig(**PyramidVisionTransformer.tiny_overrides(PvtConfig())))
    assert detect_layout(tiny_v1.state_dict(), "pvt_v2") == "vitlab"  # official v1 keys are not v2's
    tiny_v2 = PyramidVisionTransformerV2(PvtV2Config(**PyramidVisionTransformerV2.tiny_overrides(PvtV2Config())))
    assert detect_layout(tiny_v2.state_dict(), "pvt_v2") == "vitlab"  # vitlab's own keys need no conversion


def test_hf_detectors_do_not_misfire():
    """HF v1 keys are not claimed as v2, nor v2 as v1."""
    assert detect_layout(hf_v1().state_dict(), "pvt_v2") == "vitlab"
    assert detect_layout(hf_v2().state_dict(), "pvt") == "vitlab"


# ---------------------------------------------------------------------------------- PVT v1
# Parameter names (and shapes) of the official code's PyramidVisionTransformer (whai362/PVT
# classification/pvt.py) built with img_size=64, patch_size=4, embed_dims=[4, 8, 20, 32],
# num_heads=[1, 2, 5, 8], depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], 10 classes.
OFFICIAL_V1_KEYS = """
pos_embed1:1x256x4 pos_embed2:1x64x8 pos_embed3:1x16x20 pos_embed4:1x5x32 cls_token:1x1x32
patch_embed1.proj.weight:4x3x4x4 patch_embed1.proj.bias:4 patch_embed1.norm.weight:4 patch_embed1.norm.bias:4
block1.0.norm1.weight:4 block1.0.norm1.bias:4 block1.0.attn.q.weight:4x4 block1.0.attn.q.bias:4
block1.0.attn.kv.weight:8x4 block1.0.attn.kv.bias:8 block1.0.attn.proj.weight:4x4 block1.0.attn.proj.bias:4
block1.0.attn.sr.weight:4x4x8x8 block1.0.attn.sr.bias:4 block1.0.attn.norm.weight:4 block1.0.attn.norm.bias:4
block1.0.norm2.weight:4 block1.0.norm2.bias:4 block1.0.mlp.fc1.weight:32x4 block1.0.mlp.fc1.bias:32
block1.0.mlp.fc2.weight:4x32 block1.0.mlp.fc2.bias:4
patch_embed2.proj.weight:8x4x2x2 patch_embed2.proj.bias:8 patch_embed2.norm.weight:8 patch_embed2.norm.bias:8
block2.0.norm1.weight:8 block2.0.norm1.bias:8 block2.0.attn.q.weight:8x8 block2.0.attn.q.bias:8
block2.0.attn.kv.weight:16x8 block2.0.attn.kv.bias:16 block2.0.attn.proj.weight:8x8 block2.0.attn.proj.bias:8
block2.0.attn.sr.weight:8x8x4x4 block2.0.attn.sr.bias:8 block2.0.attn.norm.weight:8 block2.0.attn.norm.bias:8
block2.0.norm2.weight:8 block2.0.norm2.bias:8 block2.0.mlp.fc1.weight:64x8 block2.0.mlp.fc1.bias:64
block2.0.mlp.fc2.weight:8x64 block2.0.mlp.fc2.bias:8
patch_embed3.proj.weight:20x8x2x2 patch_embed3.proj.bias:20 patch_embed3.norm.weight:20 patch_embed3.norm.bias:20
block3.0.norm1.weight:20 block3.0.norm1.bias:20 block3.0.attn.q.weight:20x20 block3.0.attn.q.bias:20
block3.0.attn.kv.weight:40x20 block3.0.attn.kv.bias:40 block3.0.attn.proj.weight:20x20 block3.0.attn.proj.bias:20
block3.0.attn.sr.weight:20x20x2x2 block3.0.attn.sr.bias:20 block3.0.attn.norm.weight:20 block3.0.attn.norm.bias:20
block3.0.norm2.weight:20 block3.0.norm2.bias:20 block3.0.mlp.fc1.weight:80x20 block3.0.mlp.fc1.bias:80
block3.0.mlp.fc2.weight:20x80 block3.0.mlp.fc2.bias:20
patch_embed4.proj.weight:32x20x2x2 patch_embed4.proj.bias:32 patch_embed4.norm.weight:32 patch_embed4.norm.bias:32
block4.0.norm1.weight:32 block4.0.norm1.bias:32 block4.0.attn.q.weight:32x32 block4.0.attn.q.bias:32
block4.0.attn.kv.weight:64x32 block4.0.attn.kv.bias:64 block4.0.attn.proj.weight:32x32 block4.0.attn.proj.bias:32
block4.0.norm2.weight:32 block4.0.norm2.bias:32 block4.0.mlp.fc1.weight:128x32 block4.0.mlp.fc1.bias:128
block4.0.mlp.fc2.weight:32x128 block4.0.mlp.fc2.bias:32
norm.weight:32 norm.bias:32 head.weight:10x32 head.bias:10
"""


def test_v1_keys_are_the_official_keys():
    """An official PVT v1 checkpoint loads without conversion (same names, same shapes)."""
    expected = {k: tuple(int(d) for d in s.split("x")) for k, s in (e.split(":") for e in OFFICIAL_V1_KEYS.split())}
    model = PyramidVisionTransformer(PvtConfig(image_size=64, dims=(4, 8, 20, 32), depths=(1, 1, 1, 1), num_classes=10))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps["patch_embed1.norm"] == eps["block1.0.attn.norm"] == 1e-5  # official: nn.LayerNorm defaults
    assert eps["block1.0.norm1"] == eps["norm"] == 1e-6  # official: partial(nn.LayerNorm, eps=1e-6)


PAPER_PARAMS_M = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_pvt_v1_counts_match_the_paper(name):
    """PVT v1 parameter counts against the paper.

    Reference: Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense
    Prediction without Convolutions" (ICCV 2021, arXiv:2102.12122), Table 2 (ImageNet-1k
    classification, "#Param (M)": PVT-Tiny 13.2, PVT-Small 24.5, PVT-Medium 44.2, PVT-Large
    61.4), the same figures as the model zoo in the official repository's
    classification/README.md. The exact counts in OTHER_PARAM_COUNTS
    (tests/test_registry_models.py) were obtained by building the official code's
    ``pvt_tiny`` .. ``pvt_large`` (whai362/PVT classification/pvt.py: 224x224 input,
    1000 classes); test_exact_parameter_count checks vitlab equals them exactly, this test
    that they round to the paper's table.
    """
    with torch.device("meta"):
        model = build_model(name)
    count = model.num_params()
    assert count == OTHER_PARAM_COUNTS[name]
    assert round(count / 1e6, 1) == PAPER_PARAMS_M[name]


def test_v1_class_token_and_position_embeddings():
    model = PyramidVisionTransformer(PvtConfig(**PyramidVisionTransformer.tiny_overrides(PvtConfig()))).eval()
    assert model.grid_sizes == [(16, 12), (8, 6), (4, 3), (2, 2)]
    assert model.pos_embed4.weight.shape[1] == 1 + 4 and model.pos_embed1.weight.shape[1] == 16 * 12
    assert model.no_weight_decay() == {"pos_embed1.weight", "pos_embed2.weight", "pos_embed3.weight", "pos_embed4.weight", "cls_token"}
    x = torch.randn(1, 3, 64, 48)
    # The class token (index 0) is what the head reads: changing it changes the logits.
    with torch.no_grad():
        ref = model(x)
        model.cls_token.add_(1.0)
        assert not torch.allclose(model(x), ref)
    # Another grid: each stage's grid rows resampled as timm's resample_abs_pos_embed does
    # (bicubic, antialias; reference values in timm_resample.safetensors), the class row kept.
    ref = resample_reference()
    with torch.no_grad():
        model.pos_embed4.weight.copy_(ref["pvt_v1.pos_embed4"])
    pe = model.position_embedding(3, (9, 14))
    assert pe.shape == (1, 1 + 9 * 14, 32)
    torch.testing.assert_close(pe.detach(), ref["pvt_v1.pos_embed4.9x14"], atol=1e-6, rtol=0)


def test_v1_checkpoint_of_another_size_is_resampled():
    """A 64x64 model's per-stage embeddings (grids 16/8/4/2) loaded into a 96x96 model (24/12/6/3)
    equal timm's resampler on them (timm_resample.safetensors); stage 4 keeps its class row."""
    ref = resample_reference()
    small = PyramidVisionTransformer(PvtConfig(image_size=64, dims=(4, 8, 20, 32), depths=(1, 1, 1, 1)))
    big = PyramidVisionTransformer(PvtConfig(image_size=96, dims=(4, 8, 20, 32), depths=(1, 1, 1, 1)))
    sd = {**small.state_dict(), **{f"pos_embed{i}": ref[f"pvt_v1.pos_embed{i}"] for i in range(1, 5)}}
    load_state_dict_checked(big, sd)
    for i, side in enumerate((24, 12, 6, 3), start=1):
        expected = ref[f"pvt_v1.pos_embed{i}.{side}x{side}"]
        torch.testing.assert_close(getattr(big, f"pos_embed{i}").weight.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(big.cls_token, small.cls_token)


# ---------------------------------------------------------------------------------- attention
def capture(model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with vitlab.capture_attention(model) as cap:
            out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return cap.records


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_tiny"])
def test_sra_key_count_is_reduced_grid(name):
    """Spatial-reduction attention: (H/sr) * (W/sr) keys per query (plus v1's class token)."""
    torch.manual_seed(0)
    model = build_model(name, dims=(4, 8, 20, 32), depths=(2, 1, 1, 1), image_size=(64, 48))
    records = capture(model, torch.randn(1, 3, 64, 48))
    assert len(records) == 5
    sr = (8, 8, 4, 2, 1)
    grids = [(16, 12), (16, 12), (8, 6), (4, 3), (2, 2)]
    for r, s, (h, w) in zip(records, sr, grids):
        p = 1 if name == "pvt_tiny" and r.name.startswith("block4") else 0  # v1's class token
        assert r.info["grid"] == (h, w) and r.info["sr_ratio"] == s
        assert r.info["key_grid"] == (h // s, w // s)
        assert r.info["num_prefix_tokens"] == r.info["num_key_prefix_tokens"] == p
        assert r.probs.shape[0] == 1 and r.probs.shape[2:] == (p + h * w, p + (h // s) * (w // s))
    heads = [1, 1, 2, 5, 8]
    assert [r.probs.shape[1] for r in records] == heads


def test_linear_sra_pools_keys_to_7x7():
    model = build_model("pvt_v2_b2_li", dims=(4, 8, 20, 32), depths=(1, 1, 1, 1), image_size=(64, 48))
    records = capture(model, torch.randn(1, 3, 64, 48))
    assert [r.info["reduction"] for r in records] == ["pool"] * 4
    assert all(r.info["key_grid"] == (7, 7) and r.probs.shape[-1] == 49 for r in records)
    assert [r.probs.shape[-2] for r in records] == [16 * 12, 8 * 6, 4 * 3, 2 * 2]
    # Every stage has the 1x1 reduction conv + norm, and the MLP a ReLU before the dw conv.
    for stage in model.stages:
        blk = stage.blocks[0]
        assert blk.attn.sr.kernel_size == (1, 1) and isinstance(blk.attn.act, nn.GELU)
        assert isinstance(blk.mlp.mid.relu, nn.ReLU)


def test_sra_module_matches_a_direct_computation():
    """SRA = softmax(q k^T / sqrt(d)) v with k, v from LayerNorm(conv_sr(grid))."""
    torch.manual_seed(0)
    attn = SpatialReductionAttention(8, heads=2, sr_ratio=2).eval()
    x = torch.randn(1, 6 * 4, 8)
    grid = (6, 4)
    fmap = x.transpose(1, 2).reshape(1, 8, 6, 4)
    ctx = attn.norm(attn.sr(fmap).flatten(2).transpose(1, 2))  # (1, 3*2, 8)
    q = attn.q(x).view(1, 24, 2, 4).transpose(1, 2)
    k, v = attn.kv(ctx).view(1, 6, 2, 2, 4).permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-2, -1)) / 2.0).softmax(-1) @ v  # sqrt(head_dim 4) = 2
    expected = attn.proj(out.transpose(1, 2).reshape(1, 24, 8))
    torch.testing.assert_close(attn(x, grid), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        SpatialReductionAttention(8, heads=2, sr_ratio=2, num_prefix_tokens=1)


# ---------------------------------------------------------------------------------- contract
def test_mixed_layernorm_eps_like_timm():
    model = build_model("pvt_v2_b0")
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps["patch_embed.norm"] == eps["stages.1.downsample.norm"] == eps["stages.0.blocks.0.attn.norm"] == 1e-5
    assert eps["stages.0.blocks.0.norm1"] == eps["stages.0.blocks.0.norm2"] == eps["stages.3.norm"] == 1e-6


def test_layer_ids_follow_depth():
    model = build_model("pvt_v2_b0", dims=(4, 8, 20, 32), depths=(2, 1, 2, 1), image_size=64)
    assert model.num_layer_ids == 6 + 2
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("stages.0.blocks.1.attn.q.weight") == 2
    assert model.layer_id("stages.1.downsample.proj.weight") == model.layer_id("stages.1.blocks.0.norm1.weight") == 3
    assert model.layer_id("stages.2.norm.weight") == model.layer_id("stages.2.blocks.1.mlp.fc1.weight") == 5
    assert model.layer_id("head.weight") == 7
    v1 = build_model("pvt_tiny", dims=(4, 8, 20, 32), depths=(2, 1, 2, 1), image_size=64)
    assert v1.layer_id("pos_embed1.weight") == v1.layer_id("patch_embed1.proj.weight") == 0
    assert v1.layer_id("patch_embed2.norm.bias") == v1.layer_id("block2.0.attn.kv.weight") == 3
    assert v1.layer_id("cls_token") == v1.layer_id("pos_embed4.weight") == v1.layer_id("block4.0.norm1.weight") == 6
    assert v1.layer_id("norm.weight") == v1.layer_id("head.bias") == 7


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_tiny"])
def test_grad_checkpointing_is_used_in_training(name, monkeypatch):
    calls = []
    real = checkpoint_home.checkpoint_seq

    def counting(fn, x, *args, **kwargs):
        calls.append(fn)
        return real(fn, x, *args, **kwargs)

    monkeypatch.setattr(checkpoint_home, "checkpoint_seq", counting)
    model = build_model(name, dims=(4, 8, 20, 32), depths=(1, 1, 1, 1), image_size=64)
    model.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 64, 64)
    model.eval()(x)
    assert calls == []  # eval: plain forward
    model.train()(x).sum().backward()
    assert len(calls) == 4


def test_errors_speak_to_the_user():
    model = build_model("pvt_v2_b0", dims=(4, 8, 20, 32), depths=(1, 1, 1, 1), image_size=64)
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 29x29"):
        model(torch.randn(1, 3, 28, 64))
    model(torch.randn(1, 3, 29, 29))  # the smallest size works (stage grids 8, 4, 2, 1)
    li = build_model("pvt_v2_b2_li", dims=(4, 8, 20, 32), depths=(1, 1, 1, 1), image_size=64)
    assert li(torch.randn(1, 3, 8, 8)).shape == (1, 1000)  # linear SRA has no minimum grid
    with pytest.raises(ValueError, match="sr_ratio must be 1"):
        PvtConfig(sr_ratios=(8, 4, 2, 2))
    with pytest.raises(ValueError, match="divisible by heads"):
        PvtV2Config(dims=(4, 8, 20, 30))
    with pytest.raises(ValueError, match="entries but depths has 4"):
        PvtV2Config(heads=(1, 2, 5))
    with pytest.raises(ValueError, match="too small"):
        PvtConfig(image_size=16)
    unpadded = build_model("pvt_tiny", dims=(4, 8, 20, 32), depths=(1, 1, 1, 1), image_size=64, pad_input=False)
    with pytest.raises(ValueError, match="multiple of the total stride 32"):
        unpadded(torch.randn(1, 3, 64, 36))
