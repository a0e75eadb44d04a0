"""Swin Transformer (v1): numerical parity with timm and Hugging Face, shifted-window masking,
bias-table adaptation between window sizes, and the family's contract details.

The timm reference is the golden fixture ``fixtures/timm_swin.safetensors`` (stage grids
16/8/4/2 with window 4: shifted + masked windows in stages 0-1, one window in stage 2, the
window clipped to 2x2 in stage 3). The Hugging Face reference is ``transformers``'
``SwinForImageClassification`` with re-randomised weights, run here.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitlab
from vitlab.models import SwinConfig, SwinTransformer, build_model, create_model
from vitlab.components import resample_relative_position_table
from vitlab.models import base as checkpoint_home  # where the blocks are checkpointed
from vitlab.models import swin as swin_module
from vitlab.pretrained import convert_state_dict, detect_layout, load_state_dict_checked, save_checkpoint

from timm_fixtures import resample_reference, timm_fixture

TINY = dict(image_size=32, patch_size=2, window_size=4, dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4))


def model_from_timm_kwargs(kw: dict) -> SwinTransformer:
    """The vitlab equivalent of ``timm.models.swin_transformer.SwinTransformer(**kw)``."""
    return SwinTransformer(SwinConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], in_channels=kw["in_chans"],
        num_classes=kw["num_classes"], dim=kw["embed_dim"], depths=tuple(kw["depths"]),
        heads=tuple(kw["num_heads"]), window_size=kw["window_size"], mlp_ratio=kw["mlp_ratio"],
        drop_path=kw["drop_path_rate"],
    )).eval()


# --------------------------------------------------------------------------- timm parity
def test_timm_fixture_parity():
    kw, sd, t, _ = timm_fixture("swin")
    model = model_from_timm_kwargs(kw)
    converted, layout = convert_state_dict(sd, model)
    assert layout == "timm"
    load_state_dict_checked(model, converted)
    # The fixture exercises what it claims: clipped 3x3-offset table in the last stage.
    assert model.layers[3].blocks[0].attn.relative_position.table.shape == (9, 4)
    assert model.layers[0].blocks[1].attn.shift == (2, 2) and model.layers[2].blocks[1].attn.shift == (0, 0)
    with torch.no_grad():
        out = model(t["input"])
        feats = model.forward_features(t["input"])  # (B, C, H, W); timm's are NHWC
        last = model.forward_intermediates(t["input"], indices=1, norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(out, t["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.permute(0, 2, 3, 1), t["features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, feats)


def test_original_microsoft_layout_parity():
    """Microsoft's checkpoints merge patches at the end of stages 0..2 and name the head ``head``."""
    kw, timm_sd, t, _ = timm_fixture("swin")
    sd = {}
    for k, v in timm_sd.items():
        if k.startswith("layers.") and ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.")
        sd[k.replace("head.fc.", "head.")] = v
    sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)  # stored buffer
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    model = model_from_timm_kwargs(kw)
    converted, layout = convert_state_dict(sd, model)
    assert layout == "timm"
    load_state_dict_checked(model, converted)
    with torch.no_grad():
        torch.testing.assert_close(model(t["input"]), t["output"], atol=1e-5, rtol=0)


def test_detectors_do_not_misfire():
    swin_sd = timm_fixture("swin").state_dict
    vit_sd = timm_fixture("vit").state_dict
    assert detect_layout(vit_sd, "swin") == "vitlab"  # no swin converter claims a ViT checkpoint
    assert detect_layout(swin_sd, "vit") == "vitlab"
    own = SwinTransformer(SwinConfig(**TINY)).state_dict()
    assert detect_layout(own, "swin") == "vitlab"


# ----------------------------------------------------------------------- HF parity
def hf_swin(image: int, patch: int, window: int, dim: int, depths, heads, num_labels: int = 10):
    """A transformers SwinForImageClassification with every parameter re-randomised."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(
        image_size=image, patch_size=patch, num_channels=3, embed_dim=dim, depths=list(depths),
        num_heads=list(heads), window_size=window, layer_norm_eps=1e-5, hidden_act="gelu", num_labels=num_labels,
    )
    hf = transformers.SwinForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return hf


def vitlab_from_hf(hf, **cfg) -> SwinTransformer:
    model = SwinTransformer(SwinConfig(num_classes=hf.config.num_labels, **cfg)).eval()
    converted, layout = convert_state_dict(hf.state_dict(), model)
    assert layout == "hf"
    load_state_dict_checked(model, converted)
    return model


@pytest.mark.parametrize(
    "cfg, sizes",
    [
        # Stage grids 32/16/8/4 with window 4; 30x27 pads the windows and merges odd grids.
        (dict(image_size=32, patch_size=1, window_size=4, dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4)),
         [(32, 32), (30, 27)]),
        # Swin-T's structure (window 7, depths 2-2-6-2) at stage grids 56/28/14/7.
        (dict(image_size=112, patch_size=2, window_size=7, dim=8, depths=(2, 2, 6, 2), heads=(1, 2, 4, 8)),
         [(112, 112)]),
    ],
    ids=["window4", "window7"],
)
def test_hf_parity(cfg, sizes):
    hf = hf_swin(cfg["image_size"], cfg["patch_size"], cfg["window_size"], cfg["dim"], cfg["depths"], cfg["heads"])
    model = vitlab_from_hf(hf, **cfg)
    for size in sizes:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref = hf(pixel_values=x).logits
            out = model(x)
        assert ref.abs().max() > 0.1  # a real signal, not zeros
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"input {size}")


def test_create_model_from_saved_hf_folder(tmp_path):
    """create_model(name, pretrained=<HF folder>) reads the on-disk HF names (attention.self.query, ...)."""
    hf = hf_swin(32, 1, 4, 8, (2, 2, 2, 2), (1, 2, 2, 4), num_labels=5)
    hf.save_pretrained(tmp_path)
    model = create_model(
        "swin_tiny_patch4_window7_224", pretrained=tmp_path, num_classes=5,
        image_size=32, patch_size=1, window_size=4, dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4),
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------- shifted windows
def _perturbed_output(block, x, grid, token, query):
    """Output of ``query`` (row, col) after adding noise to ``token`` (row, col), and unperturbed."""
    w = grid[1]
    y = x.clone()
    y[:, token[0] * w + token[1]] += 5.0 * torch.randn(x.shape[-1])
    with torch.no_grad():
        base = block(x, grid=grid)[:, query[0] * w + query[1]]
        out = block(y, grid=grid)[:, query[0] * w + query[1]]
    return base, out


@pytest.mark.parametrize(
    "query, inside, outside",
    [
        # Shift 2, window 4: the shifted window of (5, 5) spans rows/cols 2..5. (2, 3) is in it but not
        # in the plain window (rows/cols 4..7); (6, 6) is in the plain window but not the shifted one.
        ((5, 5), [(2, 3), (5, 2), (3, 4)], [(6, 6), (7, 4), (1, 5)]),
        # (15, 15)'s cyclic window holds rows/cols {14, 15, 0, 1}: the wrapped-around tokens of rows or
        # columns 0-1 belong to other regions and are masked out; (14, 14), (15, 14) are its own region.
        ((15, 15), [(14, 14), (15, 14)], [(0, 0), (0, 15), (15, 0), (14, 1)]),
    ],
    ids=["interior", "wrap-around-mask"],
)
def test_shifted_window_isolation(query, inside, outside):
    torch.manual_seed(0)
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    block = model.layers[0].blocks[1]  # grid 16x16, window 4, shift 2
    with torch.no_grad():  # unit-scale weights, so that every attended token visibly counts
        for name, p in block.named_parameters():
            if p.ndim == 2 and not name.endswith("table"):
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 0.5)
    grid = (16, 16)
    assert block.attn.layout(grid) == ((4, 4), (2, 2))
    x = torch.randn(1, 16 * 16, 8)
    for token in inside:
        base, out = _perturbed_output(block, x, grid, token, query)
        assert (out - base).abs().max() > 1e-3, f"token {token} is in {query}'s window but did not change it"
    for token in outside:
        base, out = _perturbed_output(block, x, grid, token, query)
        torch.testing.assert_close(out, base, atol=1e-6, rtol=0, msg=f"token {token} leaked into {query}")


# -------------------------------------------------------------- relative bias tables
NARROW = dict(dim=8, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), image_size=96, patch_size=2)  # grids 48/24/12/6


def test_window7_checkpoint_into_window12_model(tmp_path):
    small = build_model("swin_tiny_patch4_window7_224", num_classes=3, **NARROW)
    with torch.no_grad():
        for name, p in small.named_parameters():
            if name.endswith("table"):
                p.copy_(torch.arange(1, p.shape[1] + 1, dtype=p.dtype).expand_as(p) * 0.25)  # constant per head
    assert small.layers[0].blocks[0].attn.relative_position.table.shape == (13 * 13, 1)
    save_checkpoint(small, tmp_path / "w7")
    big = create_model("swin_base_patch4_window12_384", pretrained=tmp_path / "w7", **NARROW).eval()
    assert big.config.num_classes == 3
    for i, (rows, heads) in enumerate([(23 * 23, 1), (23 * 23, 2), (23 * 23, 2), (11 * 11, 4)]):
        for blk in big.layers[i].blocks:
            table = blk.attn.relative_position.table
            assert table.shape == (rows, heads)
            expected = torch.arange(1, heads + 1, dtype=table.dtype).expand_as(table) * 0.25
            torch.testing.assert_close(table, expected, atol=1e-5, rtol=0)  # constant stays constant
    # The rest of the weights came over unchanged.
    torch.testing.assert_close(big.layers[1].blocks[1].attn.qkv.weight, small.layers[1].blocks[1].attn.qkv.weight)
    out = big(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


TABLE_PAIRS = [((4, 4), (6, 6)), ((7, 7), (12, 12)), ((4, 4), (3, 3)), ((2, 2), (4, 4)), ((4, 4), (4, 6))]


@pytest.mark.parametrize("old,new", TABLE_PAIRS, ids=[f"{o[0]}x{o[1]}-{n[0]}x{n[1]}" for o, n in TABLE_PAIRS])
def test_bias_table_resampling_matches_timm(old, new):
    """A random table resized as timm's Swin checkpoint filter resizes it (resize_rel_pos_bias_table:
    geometric offsets, linear interpolation; values in timm_resample.safetensors)."""
    ref = resample_reference()
    table = ref[f"swin.table.{old[0]}x{old[1]}"]
    out = resample_relative_position_table(table, new, old)
    expected = ref[f"swin.table.{old[0]}x{old[1]}.to.{new[0]}x{new[1]}"]
    assert out.shape == expected.shape == ((2 * new[0] - 1) * (2 * new[1] - 1), 3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_timm_checkpoint_into_window6_model_resizes_tables_like_timm():
    """The window-4 fixture loaded into a window-6 model (image 96: stage grids 48/24/12/6, no
    window clipped): every bias table equals what timm's checkpoint_filter_fn makes of it."""
    kw, sd, _, _ = timm_fixture("swin")
    model = model_from_timm_kwargs({**kw, "img_size": 96, "window_size": 6})
    load_state_dict_checked(model, convert_state_dict(sd, model)[0])
    ref = resample_reference()
    keys = [k for k in sd if k.endswith("relative_position_bias_table")]
    assert len(keys) == 8 and {sd[k].shape[0] for k in keys} == {49, 9}  # window 4; 2 (clipped) in stage 3
    for key in keys:
        ours = model.get_parameter(key.replace("relative_position_bias_table", "relative_position.table"))
        torch.testing.assert_close(ours.detach(), ref[f"swin.window6.{key}"], atol=1e-6, rtol=0, msg=key)


def test_clipped_window_takes_the_central_offsets():
    """A model whose last-stage window is clipped (image 32) loads an unclipped model's (image 64)
    weights by cropping the table, and then computes exactly what the unclipped model does at 32."""
    torch.manual_seed(0)
    full = SwinTransformer(SwinConfig(**{**TINY, "image_size": 64}), num_classes=4).eval()
    clipped = SwinTransformer(SwinConfig(**TINY), num_classes=4).eval()
    assert full.layers[3].blocks[0].attn.relative_position.table.shape == (49, 4)
    assert clipped.layers[3].blocks[0].attn.relative_position.table.shape == (9, 4)
    load_state_dict_checked(clipped, full.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clipped(x), full(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- contract
def test_feature_info_and_strides():
    with torch.device("meta"):
        model = build_model("swin_tiny_patch4_window7_224")
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in model.feature_info] == [96, 192, 384, 768]
    assert model.num_features == 768
    small = SwinTransformer(SwinConfig(**{**TINY, "patch_size": 4, "image_size": 64})).eval()
    maps = small.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]


def test_layer_ids_and_no_weight_decay():
    model = SwinTransformer(SwinConfig(**TINY))
    assert model.num_layer_ids == 8 + 2
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("layers.0.blocks.0.norm1.weight") == 1
    assert model.layer_id("layers.0.blocks.1.mlp.fc2.bias") == 2
    assert model.layer_id("layers.1.downsample.reduction.weight") == model.layer_id("layers.1.blocks.0.attn.qkv.weight") == 3
    assert model.layer_id("layers.3.blocks.1.attn.proj.weight") == 8
    assert model.layer_id("norm.weight") == model.layer_id("head.weight") == 9
    ids = [model.layer_id(n) for n, _ in model.named_parameters()]
    assert ids == sorted(ids)  # parameters are registered in depth order
    nwd = model.no_weight_decay()
    assert nwd == {n for n, _ in model.named_parameters() if n.endswith("relative_position.table")}
    assert len(nwd) == 8


def test_grad_checkpointing_is_used(monkeypatch):
    calls = []
    real = checkpoint_home.checkpoint_seq

    def counting(fn, x, *args, **kwargs):
        calls.append(x.shape)
        return real(fn, x, *args, **kwargs)

    monkeypatch.setattr(checkpoint_home, "checkpoint_seq", counting)
    model = SwinTransformer(SwinConfig(**{**TINY, "patch_size": 4}), num_classes=3).train()
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    assert not calls
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert len(calls) == 8  # one per block
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 8  # never in eval


def test_attention_capture_layout():
    model = SwinTransformer(SwinConfig(**TINY)).eval()
    with vitlab.capture_attention(model) as cap:
        model(torch.randn(2, 3, 32, 32))
    assert [r.name for r in cap.records] == [f"layers.{i}.blocks.{j}.attn" for i in range(4) for j in range(2)]
    r = cap.records[1]  # stage 0, shifted block: 16 windows of 4x4 per image
    assert r.info == dict(grid=(16, 16), padded_grid=(16, 16), window=(4, 4), shift=(2, 2), batch=2)
    assert r.probs.shape == (2 * 16, 1, 16, 16)
    last = cap.records[-1]  # stage 3: one clipped 2x2 window, no shift
    assert last.info["window"] == (2, 2) and last.info["shift"] == (0, 0)
    assert last.probs.shape == (2, 4, 4, 4)


def test_patch_merging_order():
    """The 2x2 neighbours are concatenated as (0,0), (1,0), (0,1), (1,1) (row, col offsets)."""
    merge = swin_module.PatchMerging(1, 4, norm_layer=lambda d: torch.nn.Identity())
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # 4x4 grid, value = 4 * row + col
    out, grid = merge(x, (4, 4))
    assert grid == (2, 2)
    assert out[0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    odd, grid = merge(torch.ones(1, 15, 1), (3, 5))  # odd grid: zero-padded to 4x6
    assert grid == (2, 3) and odd[0, -1].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_errors_speak_to_the_user():
    model = SwinTransformer(SwinConfig(**TINY))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="not divisible by its heads"):
        SwinConfig(dim=10, heads=(3, 6, 12, 24))
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinConfig(depths=(2, 2, 6), heads=(3, 6, 12, 24))
    with pytest.raises(ValueError, match="window_size"):
        SwinConfig(window_size=0)
    with pytest.raises(ValueError, match="unknown option"):
        SwinTransformer(SwinConfig(), embed_dim=96)
