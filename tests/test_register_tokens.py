"""Register tokens (Darcet et al., "Vision Transformers Need Registers") on ViT: timm parity on golden
fixtures (``vit_reg``: class token + 2 registers, ``vit_reg_gap``: 2 registers, average pooling; both
``no_embed_class``), the prefix layout explainability reads, gradients, pooling and config errors."""

from __future__ import annotations

import re

import pytest
import torch

from vitlab.components import capture_attention
from vitlab.evaluation import AttentionVisualizer, rollout
from vitlab.models import DistilledVisionTransformer, ViTConfig, VisionTransformer
from vitlab.pretrained import convert_state_dict, load_state_dict_checked

from timm_fixtures import timm_fixture


def _config(kw: dict) -> ViTConfig:
    extra = dict(pool="mean", class_token=False) if kw.get("global_pool") == "avg" else {}
    return ViTConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], in_channels=kw["in_chans"],
        num_classes=kw["num_classes"], dim=kw["embed_dim"], depth=kw["depth"], heads=kw["num_heads"],
        mlp_dim=int(kw["embed_dim"] * kw["mlp_ratio"]), qkv_bias=kw["qkv_bias"], reg_tokens=kw["reg_tokens"],
        **extra,
    )


def _loaded(case: str):
    kw, sd, t, _ = timm_fixture(case)
    model = VisionTransformer(_config(kw)).eval()
    converted, layout = convert_state_dict(sd, model)
    assert layout == "timm"
    load_state_dict_checked(model, converted)
    return model, sd, t


@pytest.mark.parametrize("case", ["vit_reg", "vit_reg_gap"])
def test_timm_register_fixture_parity(case):
    model, sd, t = _loaded(case)
    assert sd["reg_token"].shape == (1, 2, 24) and sd["pos_embed"].shape == (1, 16, 24)  # no prefix rows
    model.load_state_dict(sd, strict=True)  # timm's keys, unconverted
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(t["input"]), t["features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(t["input"]), t["output"], atol=1e-5, rtol=0)


def test_prefix_layout_and_pooling_exclude_registers():
    model, _, t = _loaded("vit_reg_gap")
    assert model.num_prefix_tokens == 2 and model.prefix_names() == ["reg0", "reg1"]
    feats = model.forward_features(t["input"])  # (B, 2 + 16, C)
    torch.testing.assert_close(model.pool(feats), feats[:, 2:].mean(dim=1))
    assert {"reg_token", "pos_embed.weight"} <= model.no_weight_decay()
    assert re.match(model.group_matcher()["stem"], "reg_token")
    cls_model, _, _ = _loaded("vit_reg")
    assert cls_model.prefix_names() == ["cls", "reg0", "reg1"]
    layout = cls_model.token_layout((32, 32))
    assert [s.key[0] for s in layout.attention[0].queries] == ["cls", "reg0", "reg1", "grid"]
    assert layout.readout == (("cls", 0),) and layout.default_queries == ("cls",)
    assert layout.features[-1].prefix == 3


def test_attention_maps_show_register_tokens():
    model, _, t = _loaded("vit_reg")
    x = t["input"][:1]
    with capture_attention(model) as cap, torch.no_grad():
        model(x)
    probs = cap.records[-1].probs.mean(1)  # (B, 3 + 16, 3 + 16)
    assert probs.shape == (1, 19, 19)
    viz = AttentionVisualizer(model)
    cls_map = list(viz.generate_attention_maps(x, layers=[-1]))
    assert [m.query for m in cls_map] == ["cls"]
    # the class token's attention to the registers (and itself) is the prefix attention, not in the map
    torch.testing.assert_close(cls_map[0].token_map[0].flatten(), probs[0, 0, 3:])
    torch.testing.assert_close(cls_map[0].prefix_attention[0], probs[0, 0, :3].sum())
    for i in range(2):  # each register's own attention map is a query of its own
        reg = list(viz.generate_attention_maps(x, layers=[-1], query=f"reg{i}"))
        torch.testing.assert_close(reg[0].token_map[0].flatten(), probs[0, 1 + i, 3:])
    res = rollout(model, x)
    assert res.token_maps["grid"].shape == (1, 4, 4) and torch.isfinite(res.maps).all()


def test_register_token_gets_gradient_and_changes_the_output():
    model, _, t = _loaded("vit_reg_gap")
    model.train()
    model(t["input"]).square().mean().backward()
    assert model.reg_token.grad is not None and model.reg_token.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model(t["input"])
        model.reg_token.add_(torch.randn(model.reg_token.shape, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(model(t["input"]), before, atol=1e-3)


def test_masked_forward_keeps_the_registers():
    model, _, t = _loaded("vit_reg")
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    out = model.forward_features(t["input"], mask)
    assert out.shape == (2, 3 + 8, 24)


def test_register_config_errors():
    with pytest.raises(ValueError, match="reg_tokens must be an int >= 0"):
        ViTConfig(reg_tokens=-1)
    with pytest.raises(ValueError, match="cannot take register tokens"):
        ViTConfig(class_token=False, pool="mean", window_size=2, reg_tokens=1)
    with pytest.raises(ValueError, match="not supported with a distillation token"):
        DistilledVisionTransformer(image_size=32, patch_size=8, dim=24, depth=1, heads=3, mlp_dim=48, reg_tokens=2)
    # registers with a position row each (timm's no_embed_class=False) still work
    m = VisionTransformer(image_size=32, patch_size=8, dim=24, depth=1, heads=3, mlp_dim=48, reg_tokens=2,
                          no_embed_class=False)
    assert m.pos_embed.weight.shape == (1, 3 + 16, 24) and m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
