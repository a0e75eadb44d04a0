"""CaiT: timm parity, talking heads, class attention, capture and checkpoint loading.

The timm fixture (tests/fixtures/timm_cait.safetensors, see make_timm_fixtures.py) is a tiny
timm ``Cait`` (32x32 input, patch 8, dim 24, 2 talking-heads blocks with 4 heads, 2 class-
attention blocks) with every parameter re-randomised, so each weight changes the output.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import vitlab
import vitlab.models.base as checkpoint_home  # where the blocks are checkpointed
from vitlab.components import Attention
from vitlab import create_model
from vitlab.models import CaiT, CaiTConfig
from vitlab.models.cait import TalkingHeadsAttention, mix_heads
from vitlab.pretrained import convert_state_dict, detect_layout, load_state_dict_checked

from timm_fixtures import FIXTURES, resample_reference, timm_fixture


def config_from_timm(kw: dict) -> dict:
    """vitlab CaiTConfig values equivalent to timm ``Cait`` constructor kwargs."""
    return dict(
        image_size=kw["img_size"], patch_size=kw["patch_size"], in_channels=kw["in_chans"],
        num_classes=kw["num_classes"], dim=kw["embed_dim"], depth=kw["depth"], heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"], depth_token_only=kw["depth_token_only"],
        mlp_ratio_token_only=kw["mlp_ratio_token_only"], init_values=kw["init_values"],
    )


@pytest.fixture(scope="module")
def timm_case():
    """(timm state dict, other tensors, constructor kwargs) of the CaiT fixture."""
    kwargs, sd, rest, _ = timm_fixture("cait")
    return sd, rest, kwargs


@pytest.fixture()
def converted(timm_case):
    """The fixture's architecture in vitlab with the timm weights loaded (eval mode)."""
    sd, rest, kw = timm_case
    model = CaiT(CaiTConfig(**config_from_timm(kw))).eval()
    vsd, layout = convert_state_dict(sd, model)
    assert layout == "timm"
    load_state_dict_checked(model, vsd)
    return model, rest


# ------------------------------------------------------------------ parity with timm
def test_timm_parity_logits_and_features(converted):
    model, rest = converted
    x = rest["input"]
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == rest["output"].shape and feats.shape == rest["features"].shape
    torch.testing.assert_close(out, rest["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats, rest["features"], atol=1e-5, rtol=0)
    # The same with the attention capture on (explicit path everywhere).
    with torch.no_grad(), vitlab.capture_attention(model):
        torch.testing.assert_close(model(x), rest["output"], atol=1e-5, rtol=0)


def test_intermediates_match_timm_patch_features(converted):
    """Class attention leaves the patch tokens alone, so timm's normed patch features are the
    normed output of the last self-attention block, i.e. forward_intermediates(norm=True)[-1]."""
    model, rest = converted
    with torch.no_grad():
        last = model.forward_intermediates(rest["input"], indices=1, norm=True, intermediates_only=True)[0]
    b, c, h, w = last.shape
    assert (h, w) == model.grid_size
    # (B, C, H', W') -> (B, H'W', C)
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), rest["features"][:, 1:], atol=1e-5, rtol=0)


def test_converter_fuses_class_attention_kv_and_renames_gammas(timm_case, converted):
    sd, _, _ = timm_case
    model, _ = converted
    vsd = model.state_dict()
    for j in range(2):
        k, v = sd[f"blocks_token_only.{j}.attn.k.weight"], sd[f"blocks_token_only.{j}.attn.v.weight"]
        assert torch.equal(vsd[f"blocks_token_only.{j}.attn.kv.weight"], torch.cat([k, v]))
        assert torch.equal(vsd[f"blocks_token_only.{j}.attn.kv.bias"],
                           torch.cat([sd[f"blocks_token_only.{j}.attn.k.bias"], sd[f"blocks_token_only.{j}.attn.v.bias"]]))
        assert torch.equal(vsd[f"blocks_token_only.{j}.ls2.gamma"], sd[f"blocks_token_only.{j}.gamma_2"])
    assert torch.equal(vsd["blocks.1.ls1.gamma"], sd["blocks.1.gamma_1"])
    assert torch.equal(vsd["blocks.0.attn.proj_w.weight"], sd["blocks.0.attn.proj_w.weight"])


def test_detector_only_fires_on_timm_cait(timm_case, converted):
    sd, _, _ = timm_case
    model, _ = converted
    assert detect_layout(sd, "cait") == "timm"
    assert detect_layout({f"module.{k}": v for k, v in sd.items()}, "cait") == "timm"
    assert detect_layout(model.state_dict(), "cait") == "vitlab"
    for other in sorted(FIXTURES.glob("timm_*.safetensors")):
        if other.name != "timm_cait.safetensors":
            osd = timm_fixture(other).state_dict
            assert detect_layout(osd, "cait") == "vitlab", other.name


# ------------------------------------------------------------------ talking heads
def _identity_(lin: torch.nn.Linear, matrix: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        lin.weight.copy_(torch.eye(lin.in_features) if matrix is None else matrix)
        lin.bias.zero_()


def _talking_and_plain(dim: int = 8, heads: int = 2):
    torch.manual_seed(3)
    th = TalkingHeadsAttention(dim, heads).eval()
    plain = Attention(dim, heads).eval()
    plain.load_state_dict({k: v for k, v in th.state_dict().items() if not k.startswith(("proj_l", "proj_w"))})
    return th, plain


def test_talking_heads_with_identity_mixing_is_plain_attention():
    th, plain = _talking_and_plain()
    _identity_(th.proj_l)
    _identity_(th.proj_w)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(th(x), plain(x), atol=1e-6, rtol=1e-5)


def test_talking_heads_mixes_heads_hand_checked():
    """Swap the heads before the softmax (proj_l = permutation): head 0 then uses head 1's
    attention pattern on head 0's values. Checked against a by-hand computation."""
    th, plain = _talking_and_plain()
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    _identity_(th.proj_l, swap)
    _identity_(th.proj_w)
    x = torch.randn(1, 5, 8)
    out = th(x)
    assert not torch.allclose(out, plain(x), atol=1e-3)  # mixing really changes the result
    q, k, v = th.qkv_heads(x)  # (1, 2, 5, 4) each
    logits = (q * th.scale) @ k.transpose(-2, -1)  # (1, 2, 5, 5)
    probs = logits[:, [1, 0]].softmax(-1)  # head h sees head 1-h's logits
    expected = th.proj(th.merge_heads(probs @ v))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_talking_heads_general_mixing_hand_checked():
    """Random proj_l / proj_w with biases against an explicit per-head loop."""
    th, _ = _talking_and_plain(dim=12, heads=3)
    with torch.no_grad():
        for lin in (th.proj_l, th.proj_w):
            lin.weight.normal_()
            lin.bias.normal_()
    x = torch.randn(2, 4, 12)
    q, k, v = th.qkv_heads(x)
    logits = [(q[:, h] * th.scale) @ k[:, h].transpose(-2, -1) for h in range(3)]  # 3 x (B, N, N)
    L, bl = th.proj_l.weight, th.proj_l.bias
    W, bw = th.proj_w.weight, th.proj_w.bias
    mixed_logits = [sum(L[h, g] * logits[g] for g in range(3)) + bl[h] for h in range(3)]
    probs = [m.softmax(-1) for m in mixed_logits]
    weights = [sum(W[h, g] * probs[g] for g in range(3)) + bw[h] for h in range(3)]
    heads = torch.stack([weights[h] @ v[:, h] for h in range(3)], dim=1)  # (B, 3, N, 4)
    torch.testing.assert_close(th(x), th.proj(th.merge_heads(heads)), atol=1e-5, rtol=1e-5)
    # mix_heads is exactly this linear map across the head axis.
    torch.testing.assert_close(mix_heads(th.proj_w, torch.stack(probs, 1)), torch.stack(weights, 1))


# ------------------------------------------------------------------ class attention
def test_class_attention_updates_only_the_class_token(converted):
    model, rest = converted
    x = rest["input"]
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        feats = model.forward_features(x)
        logits = model(x)
        for p in model.blocks_token_only.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        maps2 = model.forward_intermediates(x, intermediates_only=True)
        feats2 = model.forward_features(x)
        logits2 = model(x)
    for a, b in zip(maps, maps2):
        assert torch.equal(a, b)  # the self-attention stage does not see the class-attention blocks
    assert torch.equal(feats[:, 1:], feats2[:, 1:])  # patch tokens untouched by class attention
    assert not torch.allclose(feats[:, 0], feats2[:, 0], atol=1e-3)  # the class token changed
    assert not torch.allclose(logits, logits2, atol=1e-3)


def test_capture_records_talking_heads_and_one_class_query(converted):
    model, rest = converted
    x = rest["input"]
    c = model.config
    n = model.grid_size[0] * model.grid_size[1]
    with torch.no_grad(), vitlab.capture_attention(model) as cap:
        model(x)
    names = [r.name for r in cap.records]
    assert names == [f"blocks.{i}.attn" for i in range(c.depth)] + [
        f"blocks_token_only.{j}.attn" for j in range(c.depth_token_only)]
    for i, r in enumerate(cap.records[: c.depth]):
        attn = model.blocks[i].attn
        assert r.probs.shape == (2, c.heads, n, n)
        assert r.info["grid"] == model.grid_size and r.info["num_prefix_tokens"] == 0
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(2, c.heads, n))  # softmax: distributions
        mixed = r.info["mixed_probs"]  # what multiplies the values: proj_w applied to the softmax
        torch.testing.assert_close(mixed, mix_heads(attn.proj_w, r.probs))
        assert not torch.allclose(mixed.sum(-1), torch.ones(2, c.heads, n), atol=1e-2)
    for r in cap.records[c.depth:]:
        assert r.probs.shape == (2, c.heads, 1, 1 + n)  # only the class token queries
        assert r.info["num_prefix_tokens"] == 1 and r.info["grid"] == model.grid_size
        on_grid = r.probs[:, :, 0, 1:].reshape(2, c.heads, *r.info["grid"])  # class -> patch map
        assert on_grid.shape == (2, c.heads, 4, 4)


def test_class_attention_map_matches_by_hand(converted):
    """The recorded class-attention row is softmax(q_cls k^T * scale) over [cls, patches]."""
    model, rest = converted
    x = rest["input"]
    blk = model.blocks_token_only[0]
    with torch.no_grad():
        tokens, grid = model.embed(x)
        for i in range(len(model.blocks)):
            tokens = model.blocks[i](tokens, grid=grid)
        with vitlab.capture_attention(model) as cap:
            blk(model.cls_token.expand(2, -1, -1), tokens, grid=grid)
        u = blk.norm1(torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1))
        q = blk.attn.split_heads(blk.attn.q(u[:, :1]))  # (B, heads, 1, d)
        k, _ = blk.attn.kv_heads(u)  # (B, heads, 1 + N, d)
        expected = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(cap.records[0].probs, expected)


# ------------------------------------------------------------------ loading checkpoints
def test_create_model_from_timm_file(timm_case, tmp_path):
    sd, rest, kw = timm_case
    values = config_from_timm(kw)
    path = tmp_path / "cait_timm.safetensors"
    save_file(sd, str(path))
    model = create_model("cait_xxs24_224", pretrained=path, **values).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(rest["input"]), rest["output"], atol=1e-5, rtol=0)
    # The original DeiT-repo form: a torch file {"model": {"module.<key>": ...}}.
    pth = tmp_path / "cait_deit_repo.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, pth)
    model = create_model("cait_xxs24_224", pretrained=pth, **values).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(rest["input"]), rest["output"], atol=1e-5, rtol=0)


def test_create_model_from_timm_file_other_size_and_classes(timm_case, tmp_path):
    sd, rest, kw = timm_case
    path = tmp_path / "cait_timm.safetensors"
    save_file(sd, str(path))
    values = {**config_from_timm(kw), "image_size": 48, "num_classes": 3}
    with pytest.warns(UserWarning, match="classifier head not loaded"):
        model = create_model("cait_xxs24_224", pretrained=path, **values)
    assert model.grid_size == (6, 6)
    # timm's resampler (its CaiT filter does not resample): bicubic, antialias, no prefix rows.
    torch.testing.assert_close(model.pos_embed.weight.detach(), resample_reference()["cait.pos_embed.6x6"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.blocks[1].attn.proj_l.weight.detach(), sd["blocks.1.attn.proj_l.weight"])
    assert model.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_wrong_architecture_checkpoint_is_reported(tmp_path):
    vit_sd = timm_fixture("vit").state_dict
    path = tmp_path / "vit.safetensors"
    save_file(vit_sd, str(path))
    with pytest.raises(ValueError, match="does not fit"):
        create_model("cait_xxs24_224", pretrained=path, image_size=32, patch_size=8, dim=24, depth=2, heads=3)


# ------------------------------------------------------------------ contract details
def test_contract_layer_ids_no_weight_decay_feature_info():
    model = CaiT(CaiTConfig(image_size=32, patch_size=8, dim=16, depth=3, heads=2, depth_token_only=2,
                            num_classes=5))
    assert model.no_weight_decay() == {"pos_embed.weight", "cls_token"}
    assert model.num_layer_ids == 3 + 2 + 2
    assert model.layer_id("pos_embed.weight") == model.layer_id("cls_token") == model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("blocks.2.attn.proj_l.weight") == 3
    assert model.layer_id("blocks_token_only.0.attn.kv.weight") == 4
    assert model.layer_id("blocks_token_only.1.ls2.gamma") == 5
    assert model.layer_id("norm.weight") == model.layer_id("head.bias") == 6
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(f["reduction"] == 8 and f["num_chs"] == 16 for f in model.feature_info)
    assert model.pos_embed.weight.shape == (1, 16, 16)  # patch tokens only, no class-token row


def test_grad_checkpointing_is_used_in_both_stages(monkeypatch):
    calls = []
    real = checkpoint_home.checkpoint_seq

    def counting(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(checkpoint_home, "checkpoint_seq", counting)
    model = CaiT(CaiTConfig(image_size=16, patch_size=8, dim=8, depth=2, heads=2, num_classes=2)).train()
    x = torch.randn(1, 3, 16, 16)
    model(x).sum().backward()
    assert calls == []
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert calls == ["Block", "Block", "ClassAttentionBlock", "ClassAttentionBlock"]
    calls.clear()
    model.eval()(x)
    assert calls == []  # never in eval


def test_drop_path_is_uniform_over_self_attention_blocks():
    model = CaiT(CaiTConfig(image_size=16, patch_size=8, dim=8, depth=3, heads=2, drop_path=0.2,
                            drop_path_token_only=0.1))
    assert [b.drop_path1.drop_prob for b in model.blocks] == [0.2, 0.2, 0.2]
    assert [b.drop_path.drop_prob for b in model.blocks_token_only] == [0.1, 0.1]


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(dim=10, heads=4), "divisible"),
        (dict(init_values=0.0), "init_values"),
        (dict(depth_token_only=0), "depth_token_only"),
        (dict(drop_path=1.0), "drop_path"),
        (dict(pool="max"), "pool"),
        (dict(image_size=8, patch_size=16), "smaller than patch_size"),
    ],
)
def test_bad_config_values_raise(values, match):
    with pytest.raises(ValueError, match=match):
        CaiTConfig(**values)


def test_unknown_option_and_bad_input_are_reported():
    with pytest.raises(ValueError, match="depth_token_only"):
        create_model("cait_xxs24_224", depth_tokens_only=1)
    model = CaiT(CaiTConfig(image_size=16, patch_size=8, dim=8, depth=1, heads=2))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 3, 4, 16))


def test_variant_pretrained_cfg():
    for name, size in [("cait_xxs24_224", 224), ("cait_s36_384", 384)]:
        with torch.device("meta"):
            model = create_model(name)
        cfg = model.pretrained_cfg
        assert cfg["hub_id"] == f"timm/{name}.fb_dist_in1k"
        assert cfg["input_size"] == size and cfg["crop_pct"] == 1.0
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    with torch.device("meta"):
        assert create_model("cait_s36_384").config.init_values == 1e-6
        assert create_model("cait_xs24_384").config.heads == 6
