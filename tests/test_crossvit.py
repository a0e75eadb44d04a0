"""CrossViT: numerical parity with timm, the cross-attention fusion, the two heads, checkpoints.

The timm golden files (tests/fixtures/timm_crossvit*.safetensors, see the README there) are
tiny timm ``CrossVit`` models: patches 8/16 (plain) and 12/16 (convolutional "dagger" stem),
branch 1 seeing the 48 px image bicubically resized to 32 px, as the released 240/224 models do.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vitlab
from vitlab.models import build_model
from vitlab.models.crossvit import ConvPatchEmbed, CrossViT, CrossViTConfig
from vitlab.pretrained import load_state_dict_checked
from vitlab.pretrained.convert import detect_layout
from vitlab.pretrained.convert_crossvit import config_from_timm_kwargs, convert_timm_crossvit

from conftest import tiny_model
from timm_fixtures import timm_fixture

CASES = {"crossvit": "crossvit_9_240", "crossvit_dagger": "crossvit_9_dagger_240"}


def read_fixture(case: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(timm kwargs, timm state dict, other tensors) of a golden file."""
    return timm_fixture(case)[:3]


def fixture_model(case: str) -> tuple[CrossViT, dict[str, torch.Tensor]]:
    """The vitlab model equivalent to a fixture's timm kwargs, with its converted weights."""
    kwargs, sd, rest = read_fixture(case)
    model = CrossViT(CrossViTConfig(**config_from_timm_kwargs(kwargs))).eval()
    load_state_dict_checked(model, convert_timm_crossvit(sd, model))
    return model, rest


# --------------------------------------------------------------------------- timm parity
@pytest.mark.parametrize("case", list(CASES))
def test_timm_parity_logits_and_features(case):
    model, ref = fixture_model(case)
    x = ref["input"]
    with torch.no_grad():
        out = model(x)
        feats = model.forward_branches(x)
    assert out.abs().max() > 0.1  # the reference logits are not trivially small
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)
    for b in range(2):
        torch.testing.assert_close(feats[b], ref[f"features.{b}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_intermediates_are_branch_major_and_match_timm_features(case):
    model, ref = fixture_model(case)
    x = ref["input"]
    depth = len(model.blocks)
    with torch.no_grad():
        maps = model.forward_intermediates(x, norm=True, intermediates_only=True)
    assert len(maps) == len(model.feature_info) == 2 * depth
    for k, (fmap, info) in enumerate(zip(maps, model.feature_info)):
        b = k // depth
        assert info["branch"] == b and info["module"] == f"blocks.{k % depth}"
        assert fmap.shape[:2] == (2, model.config.dim[b])
    # The last stage of each branch, normed, is timm's forward_features without the class token.
    for b in range(2):
        fmap = maps[(b + 1) * depth - 1]
        tokens = ref[f"features.{b}"][:, 1:]  # (B, N, C)
        expected = tokens.transpose(1, 2).reshape(fmap.shape)  # (B, N, C) -> (B, C, H', W')
        torch.testing.assert_close(fmap, expected, atol=1e-5, rtol=0)
    # Branch 1 of the plain case: the 48 px image resized to 32 px, 16 px patches -> 2 x 2.
    assert maps[-1].shape[-2:] == model.grid_sizes[1]


def test_real_variant_layout_and_feature_info():
    with torch.device("meta"):
        model = build_model("crossvit_9_240")
    assert model.image_sizes == [(240, 240), (224, 224)]
    assert model.grid_sizes == [(20, 20), (14, 14)]
    # 16 / (224/240) = 17.14 px: 18 is the integer stride with ceil(240 / r) == 14.
    assert [i["reduction"] for i in model.feature_info] == [12, 12, 12, 18, 18, 18]
    assert [i["num_chs"] for i in model.feature_info] == [128] * 3 + [256] * 3
    assert model.pretrained_cfg["hub_id"] == "timm/crossvit_9_240.in1k"
    assert model.pretrained_cfg["input_size"] == 240 and model.pretrained_cfg["crop_pct"] == 0.875
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


# --------------------------------------------------------------------------- converter
def to_timm_layout(sd: dict[str, torch.Tensor], fusion_depths: list[int]) -> dict[str, torch.Tensor]:
    """vitlab keys -> timm keys (written independently of the converter, for the round trip)."""
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if len(parts) > 4 and parts[2] == "fusion":
            stage, branch, j, rest = parts[1], parts[3], parts[4], parts[5:]
            base = f"blocks.{stage}.fusion.{branch}" + ("" if fusion_depths[int(stage)] == 0 else f".{j}")
            if rest[:2] == ["attn", "kv"]:
                k, val = v.chunk(2, dim=0)
                out[f"{base}.attn.wk.{rest[2]}"], out[f"{base}.attn.wv.{rest[2]}"] = k, val
            elif rest[:2] == ["attn", "q"]:
                out[f"{base}.attn.wq.{rest[2]}"] = v
            else:
                out[f"{base}.{'.'.join(rest)}"] = v
        else:
            out[key] = v
    return out


def test_converter_sequential_fusion_and_original_token_names():
    # Stage 0 has a 2-block fusion (timm: nn.Sequential, keys fusion.B.J), stage 1 the legacy
    # single block (keys fusion.B); the original IBM release names tokens cls_token.0 etc.
    cfg = CrossViTConfig(image_size=48, img_scale=(1.0, 2 / 3), patch_size=(8, 16), dim=(8, 16), heads=(2, 2),
                         depth=((1, 2, 2), (1, 1, 0)), num_classes=3)
    model = CrossViT(cfg)
    assert len(model.blocks[0].fusion[0]) == 2 and len(model.blocks[1].fusion[1]) == 1
    own = model.state_dict()
    timm_sd = to_timm_layout(own, [2, 0])
    assert "blocks.0.fusion.1.1.attn.wq.weight" in timm_sd and "blocks.1.fusion.1.attn.wk.bias" in timm_sd
    timm_sd["cls_token.1"] = timm_sd.pop("cls_token_1")
    assert detect_layout(timm_sd, "crossvit") == "timm"
    converted = convert_timm_crossvit(timm_sd, model)
    assert set(converted) == set(own)
    for k in own:
        assert torch.equal(converted[k], own[k]), k
    # Half a k/v pair is reported by its timm name.
    broken = dict(timm_sd)
    del broken["blocks.0.fusion.0.0.attn.wv.weight"]
    with pytest.raises(ValueError, match=r"blocks\.0\.fusion\.0\.0\.attn\.wk\.weight"):
        load_state_dict_checked(model, convert_timm_crossvit(broken, model))


def test_detector_only_fires_on_timm_crossvit():
    _, sd, _ = read_fixture("crossvit")
    assert detect_layout(sd, "crossvit") == "timm"
    assert detect_layout(tiny_model("crossvit_9_240").state_dict(), "crossvit") == "vitlab"
    for other in ("vit", "cait", "swin", "deit_distilled"):
        other_sd = timm_fixture(other).state_dict
        assert detect_layout(other_sd, "crossvit") == "vitlab", other


@pytest.mark.parametrize("case", list(CASES))
def test_create_model_from_timm_file(case, tmp_path):
    kwargs, sd, ref = read_fixture(case)
    path = tmp_path / "timm_crossvit.safetensors"
    save_file(sd, str(path))  # timm's own key layout
    overrides = config_from_timm_kwargs(kwargs)
    model = vitlab.create_model(CASES[case], pretrained=path, **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input"]), ref["output"], atol=1e-5, rtol=0)
    # Another number of classes: both heads re-initialised (warned), the body loaded.
    overrides["num_classes"] = 5
    with pytest.warns(UserWarning, match="head"):
        other = vitlab.create_model(CASES[case], pretrained=path, **overrides).eval()
    with torch.no_grad():
        feats = other.forward_branches(ref["input"])
        assert other(ref["input"]).shape == (2, 5)
    for b in range(2):
        torch.testing.assert_close(feats[b], ref[f"features.{b}"], atol=1e-5, rtol=0)
    # Another image size: each branch's position embedding is resampled on load.
    overrides.update(num_classes=10, image_size=72)
    bigger = vitlab.create_model(CASES[case], pretrained=path, **overrides).eval()
    assert bigger.grid_sizes[1] == (3, 3) and bigger.pos_embed_1.weight.shape[1] == 1 + 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bigger(torch.randn(1, 3, 72, 72))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- the paper's parts
def reference_fusion_cls(stage, outs: list[torch.Tensor], b: int, eps: float) -> torch.Tensor:
    """Branch b's class token after one fusion block, by hand from the stage's weights."""
    o = 1 - b
    proj, fuse, rev = stage.projs[b], stage.fusion[b][0], stage.revert_projs[b]
    cls = outs[b][:, :1]
    p = F.linear(F.gelu(F.layer_norm(cls, cls.shape[-1:], proj[0].weight, proj[0].bias, eps)), proj[2].weight, proj[2].bias)
    t = torch.cat([p, outs[o][:, 1:]], dim=1)  # (B, 1 + N_o, C_o)
    n = F.layer_norm(t, t.shape[-1:], fuse.norm1.weight, fuse.norm1.bias, eps)
    attn = fuse.attn
    c = t.shape[-1]
    wk, wv = attn.kv.weight[:c], attn.kv.weight[c:]
    bk, bv = attn.kv.bias[:c], attn.kv.bias[c:]
    q = F.linear(n[:, :1], attn.q.weight, attn.q.bias)
    k, v = F.linear(n, wk, bk), F.linear(n, wv, bv)
    heads, d = attn.heads, c // attn.heads
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (B, 1, 1 + N_o)
        out.append(w @ v[..., sl])
    fused = p + F.linear(torch.cat(out, dim=-1), attn.proj.weight, attn.proj.bias)
    return F.linear(F.gelu(F.layer_norm(fused, fused.shape[-1:], rev[0].weight, rev[0].bias, eps)), rev[2].weight, rev[2].bias)


@torch.no_grad()
def test_fusion_exchanges_class_token_information():
    model, ref = fixture_model("crossvit")
    stage = model.blocks[0]
    xs, layouts = model.embed(ref["input"])
    outs = [stage.blocks[b](xs[b]) for b in range(2)]
    fused = stage(xs, layouts)
    eps = model.config.norm_eps
    for b in range(2):
        # Hand-computed projection -> cross-attention on the other branch -> revert projection.
        torch.testing.assert_close(fused[b][:, :1], reference_fusion_cls(stage, outs, b, eps), atol=1e-5, rtol=0)
        torch.testing.assert_close(fused[b][:, 1:], outs[b][:, 1:])  # patch tokens do not take part
    # Perturbing only branch 1's patch tokens changes branch 0's class token (and nothing else of branch 0).
    xs2 = [xs[0], torch.cat([xs[1][:, :1], xs[1][:, 1:] + torch.randn_like(xs[1][:, 1:])], dim=1)]
    moved = stage(xs2, layouts)
    assert (moved[0][:, 0] - fused[0][:, 0]).abs().max() > 1e-2
    torch.testing.assert_close(moved[0][:, 1:], fused[0][:, 1:])
    # With the fusion's output projection zeroed, branch 1 no longer reaches branch 0's class token.
    stage.fusion[0][0].attn.proj.weight.zero_()
    stage.fusion[0][0].attn.proj.bias.zero_()
    torch.testing.assert_close(stage(xs2, layouts)[0], stage(xs, layouts)[0])


@torch.no_grad()
def test_eval_output_is_the_mean_of_the_two_heads():
    model, ref = fixture_model("crossvit")
    x = ref["input"]
    feats = model.forward_branches(x)
    h0, h1 = model.head[0](feats[0][:, 0]), model.head[1](feats[1][:, 0])
    out = model(x)
    torch.testing.assert_close(out, (h0 + h1) / 2, atol=1e-6, rtol=0)
    assert (h0 - h1).abs().max() > 0.1  # the heads disagree, so the mean is not either one
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(pre, torch.cat([feats[0][:, 0], feats[1][:, 0]], dim=1))
    assert model.num_features == pre.shape[1] == 8 + 16


def test_conv_stem_is_a_patch_embed_with_exact_grid():
    for p in (12, 16):
        stem = ConvPatchEmbed(p, 3, 16)
        for h, w in ((2 * p, 3 * p), (2 * p + 5, 3 * p - 1)):
            tokens, grid = stem(torch.randn(1, 3, h, w))
            assert grid == (-(-h // p), -(-w // p)) == stem.grid_size((h, w))
            assert tokens.shape == (1, grid[0] * grid[1], 16)
        assert [type(m).__name__ for m in stem.proj] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]
        assert stem.proj[0].kernel_size == (7, 7) and stem.proj[0].out_channels == 4


def test_attention_capture_records_branch_and_grid():
    model = tiny_model("crossvit_9_240").eval()
    h, w = model.config.image_size
    with vitlab.capture_attention(model) as cap:
        model(torch.randn(1, 3, h, w))
    depth = len(model.blocks)
    assert len(cap.records) == depth * (2 + 2)  # one block per branch + two fusions per stage
    grids = model.grid_sizes
    for r in cap.records:
        info = r.info
        if info["kind"] == "self":
            b = info["branch"]
            n = 1 + grids[b][0] * grids[b][1]
            assert r.probs.shape == (1, model.config.heads[b], n, n)
        else:
            b, o = info["branch"], info["key_branch"]
            assert o == 1 - b and ".fusion." in r.name
            assert r.probs.shape == (1, model.config.heads[o], 1, 1 + grids[o][0] * grids[o][1])
        assert info["grid"] == grids[info.get("key_branch", info["branch"])]
        assert info["num_prefix_tokens"] == 1


def test_other_input_size_resizes_each_branch():
    model = tiny_model("crossvit_9_240").eval()
    x = torch.randn(1, 3, 130, 100)
    maps = model.forward_intermediates(x, indices=[0, len(model.blocks)], intermediates_only=True)
    s1 = model.config.img_scale[1]
    assert maps[0].shape[-2:] == (-(-130 // 12), -(-100 // 12))
    assert maps[1].shape[-2:] == (-(-int(130 * s1) // 16), -(-int(100 * s1) // 16))


def test_contract_details():
    with torch.device("meta"):
        model = build_model("crossvit_9_240", drop_path=0.1)
    assert model.no_weight_decay() == {"cls_token_0", "cls_token_1", "pos_embed_0.weight", "pos_embed_1.weight"}
    assert model.num_layer_ids == 5
    assert model.layer_id("patch_embed.1.proj.weight") == model.layer_id("pos_embed_1.weight") == 0
    assert model.layer_id("blocks.2.fusion.0.0.attn.q.weight") == 3
    assert model.layer_id("head.1.weight") == model.layer_id("norm.0.bias") == 4
    # timm's stochastic depth: linspace over (deepest branch + fusion) blocks per stage; the
    # fusion takes the stage's last rate.
    rates = torch.linspace(0, 0.1, 9).tolist()
    stage = model.blocks[1]
    assert [blk.drop_path1.drop_prob for blk in stage.blocks[1]] == pytest.approx(rates[3:6])
    assert stage.blocks[0][0].drop_path1.drop_prob == pytest.approx(rates[3])
    assert stage.fusion[0][0].drop_path.drop_prob == pytest.approx(rates[5])


def test_errors_speak_to_the_user():
    model = tiny_model("crossvit_9_240").eval()
    with pytest.raises(ValueError, match="3, H, W"):
        model(torch.randn(1, 1, 120, 96))
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 16, 96))  # branch 1 would see 14 px for 16 px patches
    bad = [
        dict(multi_conv=True, patch_size=(8, 16)),
        dict(dim=(130, 256)),
        dict(depth=((0, 3, 0),)),
        dict(mlp_ratio=(3.0, 3.0)),
        dict(image_size=12),
        dict(patch_size=(12, 16, 20)),
    ]
    for values in bad:
        with pytest.raises(ValueError, match="CrossViTConfig"):
            CrossViTConfig(**values)
    with pytest.raises(ValueError, match="Did you mean 'img_scale'"):
        vitlab.create_model("crossvit_9_240", image_scale=(1.0, 1.0))
