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


# ------------------------------------------------------------------ a plain ViT / DeiT checkpoint -> registers
TINY = dict(image_size=16, patch_size=4, in_channels=1, num_classes=3, dim=24, depth=2, heads=3, mlp_dim=48)


def _plain_checkpoint(tmp_path, name: str = "vit_tiny_patch16_224"):
    """A saved plain (no register) checkpoint with a class row in its position embedding, and its state dict."""
    from vitlab import create_model, save_checkpoint

    torch.manual_seed(7)
    plain = create_model(name, **TINY)
    assert plain.pos_embed.weight.shape == (1, 1 + 16, 24)  # class row + 4x4 grid
    path = save_checkpoint(plain, tmp_path / "plain.safetensors")
    return path, {k: v.clone() for k, v in plain.state_dict().items()}


def _register_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "register" in str(w.message)]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_plain_checkpoint_loads_into_a_register_model_with_one_warning(tmp_path, name):
    from vitlab import create_model

    path, plain = _plain_checkpoint(tmp_path, name)
    torch.manual_seed(11)
    fresh = create_model(name, **TINY, reg_tokens=4)  # the same init as the loaded model gets
    torch.manual_seed(11)
    with pytest.warns(UserWarning) as record:
        model = create_model(name, pretrained=str(path), **TINY, reg_tokens=4)
    msgs = _register_warnings(record)
    assert len(msgs) == 1 and "reg_token (4 register tokens)" in msgs[0] and "class token's position row is dropped" \
        in msgs[0], msgs
    sd = model.state_dict()
    assert torch.equal(sd["reg_token"], fresh.reg_token) and 0 < sd["reg_token"].std() < 1e-5
    torch.testing.assert_close(sd["pos_embed"], plain["pos_embed"][:, 1:], rtol=0, atol=0)  # class row dropped
    for key, value in plain.items():  # everything else exactly
        if key != "pos_embed":
            assert torch.equal(sd[key], value), key
    assert model.prefix_names() == ["cls", "reg0", "reg1", "reg2", "reg3"]
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_plain_checkpoint_keeps_the_class_row_without_no_embed_class(tmp_path):
    from vitlab import create_model

    path, plain = _plain_checkpoint(tmp_path)
    torch.manual_seed(3)
    fresh = create_model("vit_tiny_patch16_224", **TINY, reg_tokens=2, no_embed_class=False)
    torch.manual_seed(3)
    with pytest.warns(UserWarning) as record:
        model = create_model("vit_tiny_patch16_224", pretrained=str(path), **TINY, reg_tokens=2, no_embed_class=False)
    msgs = _register_warnings(record)
    assert len(msgs) == 1 and "2 register rows" in msgs[0] and "class row is kept" in msgs[0], msgs
    pe = model.pos_embed.weight  # (1, 1 + 2 + 16, C): [class row, register rows, grid]
    assert pe.shape == (1, 19, 24)
    assert torch.equal(pe[:, :1], plain["pos_embed"][:, :1]) and torch.equal(pe[:, 3:], plain["pos_embed"][:, 1:])
    assert torch.equal(pe[:, 1:3], fresh.pos_embed.weight[:, 1:3]) and pe[:, 1:3].std() > 1e-3
    assert torch.equal(model.reg_token, fresh.reg_token) and torch.equal(model.cls_token, plain["cls_token"])


def test_train_pretrained_path_adds_registers_and_resamples(tmp_path):
    """``vitlab train model.pretrained=PLAIN model.overrides.reg_tokens=4`` at another input size."""
    from vitlab.tasks.image_classification import create_classifier
    from vitlab.training.config import load_config
    from vitlab.training.recipes import DIGITS_RECIPE

    path, plain = _plain_checkpoint(tmp_path)
    over = {k: v for k, v in TINY.items() if k not in ("image_size", "in_channels", "num_classes")}
    cfg = load_config(base=DIGITS_RECIPE, overrides=[f"model.pretrained={path}", "data.image_size=24",
                                                     "model.overrides=" + str({**over, "reg_tokens": 4})])
    with pytest.warns(UserWarning) as record:
        model = create_classifier(cfg, num_classes=10, channels=1, image_size=24)
    assert len(_register_warnings(record)) == 1
    assert model.reg_token.shape == (1, 4, 24) and model.pos_embed.weight.shape == (1, 36, 24)  # 6x6, no prefix rows
    assert torch.equal(model.blocks[1].mlp.fc2.weight, plain["blocks.1.mlp.fc2.weight"])
    assert model(torch.randn(1, 1, 24, 24)).shape == (1, 10)


def test_register_checkpoint_loads_without_the_register_warning(tmp_path):
    import warnings

    from vitlab import create_model, save_checkpoint

    model = create_model("vit_tiny_patch16_224", **TINY, reg_tokens=4)
    path = save_checkpoint(model, tmp_path / "reg.safetensors")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = create_model("vit_tiny_patch16_224", pretrained=str(path), **TINY, reg_tokens=4)
    assert not _register_warnings(record) and torch.equal(again.reg_token, model.reg_token)
