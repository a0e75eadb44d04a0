"""ViTDet's backbone options on vitlab's plain ViT: window attention with a few global blocks and
decomposed relative position (MViTv2 / ViTDet), against Hugging Face transformers' ``VitDetModel``
(detectron2's ViTDet ported) with random weights.

vitlab's ViT runs with ``class_token=False``; its last block's output before any norm
(``forward_intermediates(norm=False)``) is HF's ``last_hidden_state`` (VitDet has no final norm).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vitlab.components import Attention, WindowAttention, capture_attention, interpolate_pos_embed
from vitlab.components.embeddings import DecomposedRelPos, resize_rel_pos
from vitlab.models.vit import ViTConfig, VisionTransformer
from vitlab.pretrained import convert_state_dict, create_model, load_state_dict_checked, save_checkpoint
from vitlab.pretrained.convert_vitdet import vit_config_from_vitdet, vitdet_hf_to_vitlab

from optional import importable, needs

if importable("transformers"):
    from transformers import VitDetConfig, VitDetModel

#: The parity tests build Hugging Face's VitDet (the `dev` extra); the rest run without it.
needs_hf = needs("transformers", extra="pip install transformers")

TOL = dict(atol=1e-5, rtol=1e-5)


def hf_vitdet(image_size=64, pretrain_image_size=64, window_size=4, window_blocks=(0, 2), rel_pos=True, abs_pos=True,
              depth=4) -> VitDetModel:
    """A small HF VitDet (patch 8, width 32, 2 heads) with random weights whose position terms matter:
    the relative position tables and the position embedding drawn at std 0.5 (HF starts them near 0)."""
    cfg = VitDetConfig(hidden_size=32, num_hidden_layers=depth, num_attention_heads=2, patch_size=8,
                       image_size=image_size, pretrain_image_size=pretrain_image_size, window_size=window_size,
                       window_block_indices=list(window_blocks), use_relative_position_embeddings=rel_pos,
                       use_absolute_position_embeddings=True)
    model = VitDetModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "position_embeddings" in name:
                p.normal_(0.0, 0.5)
            elif name.endswith("qkv.weight"):
                p.normal_(0.0, 0.15)  # peaked attention, so what changes the logits shows in the output
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.uniform_(0.5, 1.5)
    if not abs_pos:  # built with it (HF's init fails without), then removed: forward skips a None embedding
        model.embeddings.position_embeddings = None
        model.config.use_absolute_position_embeddings = False
    return model


def vitlab_from(hf: VitDetModel, **overrides) -> VisionTransformer:
    """vitlab's ViT built from the HF config (``vit_config_from_vitdet``), loaded through the converter."""
    model = VisionTransformer(vit_config_from_vitdet(hf.config, **overrides)).eval()
    with pytest.warns(UserWarning, match="fc_norm keeps its initialisation"):
        load_state_dict_checked(model, vitdet_hf_to_vitlab(hf.state_dict(), grid=model.grid_size))
    return model


def last_map(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    return model.forward_intermediates(x, indices=[len(model.blocks) - 1], intermediates_only=True)[0]


def assert_parity(hf: VitDetModel, model: VisionTransformer, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = hf(x).last_hidden_state  # (B, C, h, w)
        out = last_map(model, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL)
    return (out - ref).abs().max().item()


# ----------------------------------------------------------------------------- config
def test_defaults_are_plain_vit():
    cfg = ViTConfig()
    assert (cfg.window_size, cfg.global_blocks, cfg.rel_pos) == (0, (), "none")
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=16, depth=2, heads=2, mlp_dim=32))
    assert not model.needs_grid
    assert all(type(b.attn) is Attention and b.attn.rel_pos is None for b in model.blocks)
    assert not any("rel_pos" in k for k in model.state_dict())


def test_config_validation():
    base = dict(image_size=32, patch_size=8, dim=16, depth=4, heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match=r"window attention \(window_size > 0\) needs class_token=False: prefix"):
        ViTConfig(**base, window_size=2)
    with pytest.raises(ValueError, match=r"global_blocks must be block indices in \[0, depth=4\), got \(1, 4\)"):
        ViTConfig(**base, window_size=2, class_token=False, pool="mean", global_blocks=(1, 4))
    with pytest.raises(ValueError, match="only apply with window attention"):
        ViTConfig(**base, class_token=False, pool="mean", global_blocks=(1,))
    with pytest.raises(ValueError, match="rel_pos must be 'none' or 'decomposed'"):
        ViTConfig(**base, rel_pos="abs")
    with pytest.raises(ValueError, match="window_size must be an int >= 0"):
        ViTConfig(**base, window_size=-1, class_token=False, pool="mean")
    cfg = ViTConfig(**base, window_size=2, class_token=False, pool="mean", global_blocks=[1, 3])  # YAML gives lists
    assert cfg.global_blocks == (1, 3) and [cfg.is_windowed(i) for i in range(4)] == [True, False, True, False]


def test_blocks_follow_the_config():
    model = VisionTransformer(ViTConfig(image_size=48, patch_size=8, dim=16, depth=4, heads=2, mlp_dim=32,
                                        class_token=False, pool="mean", window_size=4, global_blocks=(1, 3),
                                        rel_pos="decomposed"))
    for i, blk in enumerate(model.blocks):
        windowed = i in (0, 2)
        assert isinstance(blk.attn, WindowAttention) == windowed
        assert isinstance(blk.attn.rel_pos, DecomposedRelPos)
        side = 4 if windowed else 6  # the window, or the 48 / 8 token grid
        assert blk.attn.rel_pos.rel_pos_h.shape == blk.attn.rel_pos.rel_pos_w.shape == (2 * side - 1, 8)
        if windowed:
            assert blk.attn.relative_position is None and not blk.attn.clip


# ----------------------------------------------------------------------------- parity with HF VitDet
@needs_hf
def test_parity_grid_divisible_by_the_window():
    """(a) 8x8 tokens, windows of 4 in blocks 0 and 2, global 1 and 3, rel pos everywhere."""
    hf = hf_vitdet()
    model = vitlab_from(hf)
    assert_parity(hf, model, torch.randn(2, 3, 64, 64))


@needs_hf
def test_parity_grid_not_divisible_padding():
    """(b) 10x7 tokens padded to 12x8 for windows of 4 (zeros after norm1, as detectron2), and a
    grid smaller than the window (window 16 on 10x7: padded, not clipped)."""
    x = torch.randn(2, 3, 80, 56)
    hf = hf_vitdet(image_size=(80, 56), pretrain_image_size=64)
    assert_parity(hf, vitlab_from(hf), x)
    hf = hf_vitdet(image_size=(80, 56), pretrain_image_size=64, window_size=16)
    assert_parity(hf, vitlab_from(hf), x)


@needs_hf
def test_parity_pretrain_size_differs_resampled_at_conversion():
    """(c) HF: position embedding for 64 px (8x8), global rel-pos tables for 128 px (16x16), run at 96 px:
    it resamples both on forward. vitlab built for 96 px gets them resampled the same way when it
    loads (bicubic without antialias in the conversion; the tables linearly in adapt_state_dict)."""
    hf = hf_vitdet(image_size=128, pretrain_image_size=64)
    model = vitlab_from(hf, image_size=96)
    assert model.pos_embed.weight.shape == (1, 144, 32)  # 12x12 tokens
    assert hf.encoder.layer[1].attention.rel_pos_h.shape == (31, 16)
    assert model.blocks[1].attn.rel_pos.rel_pos_h.shape == (23, 16)
    assert_parity(hf, model, torch.randn(2, 3, 96, 96))


@needs_hf
def test_parity_rel_pos_tables_resampled_on_forward():
    """(c) The global blocks' tables made for 8x8 tokens, resampled linearly on forward to a 12x10
    grid in both (no absolute position embedding: vitlab resamples that from its own grid with
    timm's antialiased bicubic, HF from the pretrain grid without antialias, so they differ there)."""
    hf = hf_vitdet(abs_pos=False)
    model = vitlab_from(hf)
    assert model.pos_embed is None
    assert_parity(hf, model, torch.randn(2, 3, 96, 80))


@needs_hf
def test_explicit_path_and_captured_probabilities_match_hf():
    """Capture takes the explicit path: same output, and the recorded probabilities (per window,
    windows raster over the padded grid) are HF's attention probabilities."""
    hf = hf_vitdet(image_size=(80, 56), pretrain_image_size=64)
    model = vitlab_from(hf)
    x = torch.randn(2, 3, 80, 56)
    with torch.no_grad():
        ref = hf(x, output_attentions=True)
        with capture_attention(model) as cap:
            out = last_map(model, x)
    torch.testing.assert_close(out, ref.last_hidden_state, **TOL)
    assert [r.name for r in cap.records] == [f"blocks.{i}.attn" for i in range(4)]
    for rec, probs in zip(cap.records, ref.attentions):
        assert rec.probs.shape == probs.shape  # windowed: (B * 6 windows, heads, 16, 16); global (B, heads, 70, 70)
        torch.testing.assert_close(rec.probs, probs, **TOL)


@needs_hf
@pytest.mark.parametrize("abs_pos, size", [(True, (80, 80)), (False, (96, 72))])
def test_gradients_match_hf(abs_pos, size):
    """Backward through the fused SDPA path with the query-dependent bias: gradients of the input, of
    every rel-pos table, of qkv and of the position embedding equal HF's. 10x10 tokens (padded windows,
    tables at their size), and 12x9 tokens without position embedding (global tables resampled)."""
    hf = hf_vitdet(image_size=80, pretrain_image_size=80, abs_pos=abs_pos)
    model = vitlab_from(hf)
    grid = (size[0] // 8, size[1] // 8)
    weight = torch.randn(2, 32, *grid)
    x = torch.randn(2, 3, *size)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    (hf(xs[0]).last_hidden_state * weight).sum().backward()
    (last_map(model, xs[1]) * weight).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOL)
    hp = dict(hf.named_parameters())
    for i in range(4):
        for t in ("h", "w"):
            g = getattr(model.blocks[i].attn.rel_pos, f"rel_pos_{t}").grad
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, hp[f"encoder.layer.{i}.attention.rel_pos_{t}"].grad, **TOL)
        torch.testing.assert_close(model.blocks[i].attn.qkv.weight.grad,
                                   hp[f"encoder.layer.{i}.attention.qkv.weight"].grad, **TOL)
    if abs_pos:
        pos_grad = hp["embeddings.position_embeddings"].grad  # (1, 1 + 100, 32)
        torch.testing.assert_close(model.pos_embed.weight.grad, pos_grad[:, 1:], **TOL)
        assert pos_grad[:, 0].abs().max() == 0  # HF's class position gets no gradient: it is never used


@needs_hf
def test_switching_rel_pos_or_windows_off_changes_the_output():
    """The options are not silently ignored: the same weights without rel pos, and (both without rel
    pos) without windows, give other features (the parity tests fail in both cases too)."""
    hf = hf_vitdet(image_size=80, pretrain_image_size=80)
    model = vitlab_from(hf)
    x = torch.randn(1, 3, 80, 80)

    def variant(**change) -> VisionTransformer:
        other = VisionTransformer(dataclasses.replace(model.config, **change)).eval()
        other.load_state_dict({k: v for k, v in model.state_dict().items() if k in other.state_dict()})
        return other

    with torch.no_grad():
        windows = last_map(variant(rel_pos="none"), x)
        assert (windows - last_map(model, x)).abs().max() > 0.1
        assert (last_map(variant(rel_pos="none", window_size=0, global_blocks=()), x) - windows).abs().max() > 0.1


def test_rel_pos_with_class_token_in_global_attention():
    """A class token in global blocks with rel pos: the bias covers the grid; its row and column are 0."""
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=16, depth=2, heads=2, mlp_dim=32,
                                        rel_pos="decomposed")).eval()
    for blk in model.blocks:
        torch.nn.init.normal_(blk.attn.rel_pos.rel_pos_h)
        torch.nn.init.normal_(blk.attn.rel_pos.rel_pos_w)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        fused = model(x)
        with capture_attention(model):
            explicit = model(x)
        attn = model.blocks[0].attn
        q = torch.randn(2, 2, 1 + 20, 8)
        bias = attn.rel_pos_bias(q, (4, 5))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert bias.shape == (2, 2, 21, 21) and bias[:, :, 0].abs().max() == 0 and bias[:, :, :, 0].abs().max() == 0
    torch.testing.assert_close(bias[:, :, 1:, 1:], attn.rel_pos(q[:, :, 1:], (4, 5)))


def test_resize_rel_pos_is_linear_interpolation():
    table = torch.arange(5.0)[:, None].repeat(1, 3)  # rows 0..4
    torch.testing.assert_close(resize_rel_pos(table, 5), table)
    out = resize_rel_pos(table, 9)  # align_corners=False: (i + 0.5) * 5 / 9 - 0.5, clamped
    want = ((torch.arange(9.0) + 0.5) * 5 / 9 - 0.5).clamp(0, 4)
    torch.testing.assert_close(out[:, 0], want)


# ----------------------------------------------------------------------------- conversion
@needs_hf
def test_converter_is_registered_and_maps_every_key():
    hf = hf_vitdet()
    sd = hf.state_dict()
    model = VisionTransformer(vit_config_from_vitdet(hf.config))
    converted, layout = convert_state_dict({"backbone." + k: v for k, v in sd.items()}, model)
    assert layout == "hf_vitdet"
    own = set(model.state_dict()) - {"fc_norm.weight", "fc_norm.bias"}
    assert set(converted) == own
    torch.testing.assert_close(converted["pos_embed"], sd["embeddings.position_embeddings"][:, 1:])
    assert converted["blocks.3.attn.rel_pos.rel_pos_w"] is sd["encoder.layer.3.attention.rel_pos_w"]
    with pytest.raises(ValueError, match="not a Hugging Face VitDet checkpoint"):
        vitdet_hf_to_vitlab({"patch_embed.proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="residual conv blocks"):
        vit_config_from_vitdet(dict(residual_block_indices=[2]))


@needs_hf
def test_config_from_vitdet():
    cfg = vit_config_from_vitdet(VitDetConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              image_size=1024, window_size=14,
                                              window_block_indices=[0, 1, 3, 4, 6, 7, 9, 10],
                                              use_relative_position_embeddings=True))
    assert (cfg.window_size, cfg.global_blocks, cfg.rel_pos, cfg.class_token, cfg.num_classes, cfg.mlp_dim) == (
        14, (2, 5, 8, 11), "decomposed", False, 0, 3072)


# ----------------------------------------------------------------------------- ViTDet-B
VITDET_B = dict(num_classes=0, class_token=False, pool="mean", image_size=1024, window_size=14,
                global_blocks=(2, 5, 8, 11), rel_pos="decomposed")


@needs_hf
def test_vitdet_base_parameter_count_matches_hf():
    """ViTDet-B: the same parameters as HF's VitDetModel but for two differences, both counted:
    HF stores the position embedding for the 224 px pretraining grid plus a class row it never uses
    (1 + 14 * 14 rows) where vitlab stores it for the 1024 px grid (64 * 64 rows), and vitlab has the
    pooling norm ``fc_norm`` (2 * 768) that a ``pool="mean"`` model reads (VitDet has no head)."""
    with torch.device("meta"):
        ours = create_model("vit_base_patch16_224", **VITDET_B)
        hf = VitDetModel(VitDetConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      image_size=1024, pretrain_image_size=224, window_size=14,
                                      window_block_indices=[0, 1, 3, 4, 6, 7, 9, 10],
                                      use_relative_position_embeddings=True))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert hf.embeddings.position_embeddings.shape == (1, 197, 768) and ours.pos_embed.weight.shape == (1, 4096, 768)
    rel = sum(p.numel() for n, p in ours.named_parameters() if "rel_pos" in n)
    assert rel == 8 * 2 * 27 * 64 + 4 * 2 * 127 * 64  # windowed blocks: 2 * 14 - 1 rows; global: 2 * 64 - 1
    blocks = 12 * (2 * 2 * 768 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768))
    stem = 3 * 16 * 16 * 768 + 768
    assert n_ours - 4096 * 768 - 2 * 768 == n_hf - 197 * 768 == stem + blocks + rel == 85_737_728


def test_plain_vit_checkpoint_loads_into_a_vitdet_backbone(tmp_path):
    """A class-token ViT checkpoint (timm's keys, 32 px: 2x2 grid + class row) into a ViTDet-style
    backbone at 64 px through create_model: class token dropped, position embedding without its
    class row resampled to 4x4, fc_norm and the rel-pos tables at their init (warned); the last map
    is (B, C, H/16, W/16)."""
    src = create_model("vit_tiny_patch16_224", num_classes=10, image_size=32, depth=4)
    path = tmp_path / "vit.safetensors"
    save_checkpoint(src, path)
    overrides = dict(VITDET_B, image_size=64, depth=4, window_size=2, global_blocks=(1, 3))
    with pytest.warns(UserWarning) as warned:
        model = create_model("vit_tiny_patch16_224", pretrained=path, **overrides)
    messages = " | ".join(str(w.message) for w in warned)
    assert "fc_norm keeps its initialisation, the checkpoint's final norm is dropped" in messages
    assert "no decomposed relative position tables" in messages
    assert all(b.attn.rel_pos.rel_pos_h.abs().max() == 0 for b in model.blocks)
    want = interpolate_pos_embed(src.pos_embed.weight[:, 1:].detach(), (4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed.weight.detach(), want)
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    assert model.cls_token is None
    x = torch.randn(2, 3, 64, 80)
    maps = model.forward_intermediates(x, indices=[3], output_fmt="NCHW", intermediates_only=True)
    assert len(maps) == 1 and maps[0].shape == (2, 192, 4, 5)


def test_pos_embed_fit_drops_the_prefix_rows_the_model_lacks():
    """LearnedPosEmbed.fit: a (cls, dist, 2x2) checkpoint into a cls-only 4x4 module keeps the class row
    and resamples the grid; into a prefix-free module it drops both rows."""
    from vitlab.components import LearnedPosEmbed

    ckpt = torch.randn(1, 2 + 4, 8)
    with_cls = LearnedPosEmbed((4, 4), 8, num_prefix_tokens=1).fit(ckpt)
    torch.testing.assert_close(with_cls, interpolate_pos_embed(ckpt[:, [0, 2, 3, 4, 5]], (4, 4), 1))
    bare = LearnedPosEmbed((2, 2), 8).fit(ckpt)
    torch.testing.assert_close(bare, ckpt[:, 2:])
    odd = torch.randn(1, 7, 8)  # no square grid after 0, 1 or 2 prefix rows: left for the mismatch report
    assert LearnedPosEmbed((2, 2), 8).fit(odd) is odd


def test_windowed_model_layout_capture_and_explain():
    """token_layout declares the windows the records show; the dense assembly, attention maps and
    rollout work on windowed blocks at an input the windows do not divide."""
    from vitlab.evaluation import AttentionVisualizer, rollout
    from vitlab.evaluation.layouts import attention_layers

    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=16, depth=3, heads=2, mlp_dim=32,
                                        num_classes=5, class_token=False, pool="mean", window_size=3,
                                        global_blocks=(1,), rel_pos="decomposed")).eval()
    size = (40, 32)  # 5x4 tokens, padded to 6x6 for windows of 3
    x = torch.randn(2, 3, *size)
    layout = model.token_layout(size)
    assert [a.kind for a in layout.attention] == ["window", "self", "window"]
    with torch.no_grad(), capture_attention(model) as cap:
        logits = model(x)
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    for a, r in zip(layout.attention, cap.records):
        if a.kind == "window":
            assert (a.window, a.shift) == ((3, 3), (0, 0)) == (r.info["window"], r.info["shift"])
            assert r.info["padded_grid"] == (6, 6) and r.probs.shape == (2 * 4, 2, 9, 9)
    layers = attention_layers(model, cap.records, size)
    dense = layers[0].probs
    assert dense.shape == (2, 2, 20, 20)
    assert ((dense.sum(-1) > 0.2) & (dense.sum(-1) <= 1 + 1e-5)).all()  # less what went to padding
    maps = AttentionVisualizer(model).generate_attention_maps(x)
    assert len(maps.maps) == 3 and all(m.map.shape == (2, *size) and torch.isfinite(m.map).all() for m in maps)
    assert rollout(model, x).maps.shape == (2, *size)


def test_grad_checkpointing_and_mask():
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=16, depth=2, heads=2, mlp_dim=32,
                                        class_token=False, pool="mean", window_size=3, rel_pos="decomposed"))
    x = torch.randn(2, 3, 40, 32)
    plain = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), plain)
    with pytest.raises(ValueError, match="needs every patch token"):
        model.forward_features(x, mask=torch.zeros(2, 20, dtype=torch.bool))
    assert math.prod(model.grid_size) == 16
